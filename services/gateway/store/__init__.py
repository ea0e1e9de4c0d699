"""Stored responses and conversations (the Responses and Conversations APIs): a SQL database behind
the gateway, private per tenant, sealed at rest."""
