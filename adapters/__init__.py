"""Backend protocols: one module per upstream protocol, behind the small `Backend` Protocol."""
