"""The controller: the registry of workers and the routing table gateways watch."""
