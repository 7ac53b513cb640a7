"""Wire formats of the APIs sdserve speaks, and their pure translation to and from the canonical types.

Nothing here does I/O: the HTTP modules in `sdserve.api` use these to translate, then submit.
"""
