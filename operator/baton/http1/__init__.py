"""A small HTTP/1.1 server and client on asyncio protocols, for Baton's data plane.

The scheduler sits on every request's path and relays every streamed token, so its per-request CPU is a
product target (BENCHMARKS.md). A general-purpose framework spends most of that budget on itself: with
aiohttp a pass-through proxy that did nothing else cost about 3.5 ms of CPU per streamed request on the
benchmark machine. These modules do only what the scheduler and the engine simulator need, parse in the
data callbacks (no coroutine switch per received chunk) and can splice a streamed engine answer straight
into the client's connection.

- `server`  keep-alive HTTP/1.1 server: exact-path routing, Content-Length and chunked request bodies,
            `Expect: 100-continue`, size limits, whole, iterated and pushed (spliced) streamed responses
            with write backpressure, idle-connection reaping, a send timeout for clients that stop reading,
            and graceful shutdown.
- `reading` socket reads into a reused buffer (asyncio allocates 256 KiB per read otherwise).
- `fields`  header field values both sides read alike (the Connection header's options).
- `client`  keep-alive connection pools per host:port: whole answers, or a streamed answer whose first
            bytes are awaited and whose rest is pushed to callbacks, with connect and read timeouts.
"""
