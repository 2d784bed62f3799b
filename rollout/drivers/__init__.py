"""How the controller reaches a node. `base` holds the Driver protocol and its errors."""
