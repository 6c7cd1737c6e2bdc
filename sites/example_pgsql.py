"""Example: a site on PostgreSQL. Copy to sites/<your site>.py and edit."""

STORAGE_BACKEND = "pgsql"
STORAGE_HOST = "127.0.0.1"
STORAGE_PORT = 5432
STORAGE_SOCKET = None          # e.g. "/var/run/postgresql" (the socket's directory)
STORAGE_USER = "postgres"
STORAGE_PASS = ""
STORAGE_DB = "cluster"
STORAGE_CHUNK_SIZE = 65535
EXPIRY_TIMEOUT = 6000
VAR_DIR = None                 # any var/*/storage/images...
# CACHE_CONTROL = "public, max-age=86400"
