"""Directory operations (LDAP / Active Directory) the agent performs for home."""
