"""Merak's automatic partitioner: trace on meta, cost every node, cut into balanced stages."""
