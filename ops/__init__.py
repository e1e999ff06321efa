"""Operator tooling: the local cluster supervisor (``cluster``), the rebalance
coordinator (``rebalance``) and the zmq load generator (``bench``).

Applications import ``zkv`` (the SDK); these modules are what the ``zkv`` CLI runs for
operators, and they use the SDK and the protocol like any other client.
"""
