HTTP/2 visitors get flow-control windows of 256 KiB per stream and 1 MiB per connection (the
protocol's defaults, 64 KiB, held an upload to 64 KiB per round trip): a 200 MB upload by
`curl --http2` through relay and tunnel went from 156-214 to 214-282 MB/s on loopback, with 2.0-2.6
instead of 2.8-3.5 CPU-seconds per GB in the tunnel (HTTP/1.1: about 500 MB/s, 1.7 s/GB).
