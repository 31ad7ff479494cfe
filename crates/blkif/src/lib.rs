//! Xen PV block protocol core (see module docs as they land).
