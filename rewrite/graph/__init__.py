"""The graph and what holds it: the IR and its typed info, capture, graph queries and node building, the
pass protocol and pipeline, transactions, train/eval modes, outlining, and archives with their codec."""
