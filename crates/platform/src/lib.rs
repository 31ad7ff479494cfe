//! The hypervisor seam: grant mapping/copy, event channels, xenstore access; `sim` and `linux`.
