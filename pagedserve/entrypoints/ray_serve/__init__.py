"""`pagedserve serve --num-replicas N`: data-parallel engine replicas on Ray Serve behind the same OpenAI
server, with a session- and prefix-aware router."""
