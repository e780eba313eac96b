The relay keeps lease names, reservations and public port assignments in an SQLite lease store in its
state directory (`leases.sqlite3`, WAL, one small write per change) instead of rewriting `leases.json`
after every registration; an existing `leases.json` / `ports.json` is imported once and renamed
`*.migrated`. A damaged store stops the relay (exit 1, naming the file and how to restore it) instead
of handing every name to whoever registers first, and the state directory is locked against a second
relay. A relay that cannot start (busy port, damaged store, locked directory) now logs one line and
exits 1 under `twistd -n` too. A name (or port) is reserved for its owner after it lapses only once it
has been held for `--reserve-after` seconds (600 by default), and when a port range is full the oldest
reservation is given to a new lease first; a refusal says when the next port frees.
