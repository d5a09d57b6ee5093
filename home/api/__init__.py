"""Home's HTTPS API (issue 15): OAuth2, authentication, metrics, status page, SCIM mount.

Imported only by ``tether-home serve --api-listen``; its dependencies are the
``home`` extra, never installed on the appliance.
"""
