"""The Pilot registry (SPEC section 11): its wire-protocol client (``registry.client``), the
embedded server (``registry.server``) and the signed strings both use
(``registry.challenges``). Importing the package imports none of them."""
