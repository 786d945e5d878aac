"""The router: the OpenAI-compatible ingress, the prefix index and the routing policies.

The decision path's modules may run compiled (``router.compiled``); this import makes sure a
build older than its source never runs.
"""

from router.compiled import guard

guard()
