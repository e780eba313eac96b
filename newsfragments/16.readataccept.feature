The relay reads each connection of its client-first listeners (public, control, HTTP) right after
accepting it: with the kernel's deferred accept the first bytes are already there, and the next
reactor turn's `epoll_wait` is saved (6.8 instead of about 7.5 per new stream visitor).
