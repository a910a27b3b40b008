"""The graph and what holds it: the IR and its typed info, capture, graph queries and node building, the
pass protocol and pipeline, transactions, train/eval modes (with the dropout kernels they switch), row
gathers, outlining, and archives with their codec."""
