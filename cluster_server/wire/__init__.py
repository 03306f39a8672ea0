"""Between processes: the channel (framed JSON over SOCK_SEQPACKET, fds alongside)."""
