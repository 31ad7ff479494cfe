//! xenstore wire protocol: client and in-memory server.
