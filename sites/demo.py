"""The demo site: the embedded SQLite database, no server needed.

`serve-image demo` creates the database with a few sample images and serves it.
"""

STORAGE_BACKEND = "sqlite"
# A relative path is relative to this file.
STORAGE_DB = "../.demo/cluster.sqlite"
STORAGE_CHUNK_SIZE = 65535
EXPIRY_TIMEOUT = 6000
VAR_DIR = "var/demo"
