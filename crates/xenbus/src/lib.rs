//! Device lifecycle over xenstore: the XenbusState machine and negotiation.
