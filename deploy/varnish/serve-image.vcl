vcl 4.1;
# Varnish in front of serve-image (docs/operations.md, "Varnish or a CDN in
# front"). serve-image's write commands send `PURGE /<name>` here (the site's
# PURGE_URLS) once a file is stored, replaced or deleted; this VCL drops the
# cached object at once. Change the backend and the purgers to yours.

backend serve_image {
    .host = "127.0.0.1";
    .port = "8000";
    .connect_timeout = 2s;
    .first_byte_timeout = 60s;
}

# The hosts that run serve-image's write commands (import, rm, purge,
# invalidate) and so send PURGE. Nobody else may.
acl purgers {
    "127.0.0.1";
    "::1";
}

sub vcl_recv {
    if (req.url ~ "^/var/([^/]+/)?storage/images(-versioned)?/") {
        # serve-image ignores the query string: one object per file, so that
        # one PURGE of the file's path reaches every way it was asked for.
        set req.url = regsub(req.url, "\?.*$", "");
    }
    if (req.method == "PURGE") {
        if (client.ip !~ purgers) {
            return (synth(403, "Forbidden"));
        }
        return (purge);
    }
}

sub vcl_hash {
    # A stored file is the same under every host name of the site: hash its
    # path alone, so the PURGE (sent to this address, not the site's) finds it.
    if (req.url ~ "^/var/([^/]+/)?storage/images(-versioned)?/") {
        hash_data(req.url);
        return (lookup);
    }
}
