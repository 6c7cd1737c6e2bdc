"""Database drivers: connections, pools, failover, dialect and errors of each database."""
