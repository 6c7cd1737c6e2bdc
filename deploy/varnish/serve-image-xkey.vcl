vcl 4.1;
# serve-image.vcl with purges by key, for sites with SURROGATE_KEY_HEADER =
# "xkey": needs the xkey vmod (Debian: varnish-modules). Every response of
# serve-image carries `xkey: <the file's name hash>`, and so does every PURGE
# it sends; a purge by key drops every object of the file, however its path
# was spelt (percent-encoding in lower or upper case, say), and the purge of
# the path drops a cached 404 for a name that now has a file.
import xkey;

backend serve_image {
    .host = "127.0.0.1";
    .port = "8000";
    .connect_timeout = 2s;
    .first_byte_timeout = 60s;
}

acl purgers {
    "127.0.0.1";
    "::1";
}

sub vcl_recv {
    if (req.url ~ "^/var/([^/]+/)?storage/images(-versioned)?/") {
        set req.url = regsub(req.url, "\?.*$", "");
    }
    if (req.method == "PURGE") {
        if (client.ip !~ purgers) {
            return (synth(403, "Forbidden"));
        }
        if (req.http.xkey) {
            set req.http.xkey-purged = xkey.purge(req.http.xkey);
        }
        return (purge);
    }
}

sub vcl_hash {
    if (req.url ~ "^/var/([^/]+/)?storage/images(-versioned)?/") {
        hash_data(req.url);
        return (lookup);
    }
}

sub vcl_deliver {
    # The key is for this cache, not for browsers.
    unset resp.http.xkey;
}
