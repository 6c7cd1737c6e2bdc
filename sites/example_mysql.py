"""Example: a site on MySQL / MariaDB (an existing eZ Publish cluster database works as is).

Copy to sites/<your site>.py and edit. The names are those of eZ Publish's
per-siteaccess index_image-*.php, so its settings can be carried over.
"""

STORAGE_BACKEND = "mysql"      # "mysql", "pgsql" or "sqlite"
STORAGE_HOST = "127.0.0.1"
STORAGE_PORT = 3306
STORAGE_SOCKET = None          # e.g. "/run/mysqld/mysqld.sock"; overrides host and port
STORAGE_USER = "fred"
STORAGE_PASS = "secret"
STORAGE_DB = "cluster"
STORAGE_CHUNK_SIZE = 65535     # eZ's DBChunkSize: the largest a MySQL BLOB holds
EXPIRY_TIMEOUT = 6000          # seconds: Cache-Control max-age and Expires
VAR_DIR = "var/intranet"       # serve only var/intranet/storage/...; None serves any var/*/
# STORAGE_POOL_SIZE = 10       # connections per worker
# STORAGE_CONNECT_TIMEOUT = 2  # seconds before a connect attempt gives up (then 503)
# STORAGE_ACQUIRE_TIMEOUT = 1  # seconds a request waits for a free connection (then 503)
# HTTP_CACHE = True            # ETag, Last-Modified and conditional requests (304/412)
# HTTP_RANGE = True            # Range requests (206/416)
