"""kopf at the edge: what reacts to what (handlers), how the operator starts (run) and its settings. The only
importer of kopf."""
