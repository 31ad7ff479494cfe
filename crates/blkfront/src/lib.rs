//! A simulated xen-blkfront: the guest side over the simulator.
