"""Active Directory incremental sync (filled in below)."""
