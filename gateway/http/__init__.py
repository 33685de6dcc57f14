"""The HTTP side: the edge that reads heads with llhttp, the aiohttp app, endpoints and admin.

A request enters here (`edge`, or aiohttp's own road for what the edge hands over),
becomes a `ClientExchange` (`exchange`), and is served by `gateway.flow.proxy`.
"""
