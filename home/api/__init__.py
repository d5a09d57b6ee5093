"""Home's HTTPS API for identity clouds (issue 15): SCIM, OAuth2 clients, authentication, metrics, status."""
