//! The part of librados' and librbd's C API the RBD backend uses, loaded at run time.
//!
//! The libraries are opened with `dlopen` the first time an `rbd:` target is opened
//! (`librbd.so.1`, `librados.so.2`: Debian's librbd1 and librados2, which ceph-common
//! brings), not linked: xenblkd then runs on hosts without Ceph (the lab's dom0, most
//! hosts), and only an RBD disk needs the libraries, failing with a message that names
//! them. QEMU does the same with its `block-rbd` module. The declarations follow
//! `rbd/librbd.h` and `rados/librados.h` of Ceph 16 (Pacific); the functions used have
//! kept their signatures since Ceph 12 (`rbd_aio_readv`/`rbd_aio_writev` appeared in 12).
//!
//! Every `unsafe` block of the backend is in this module or says why in its own SAFETY
//! comment; the handles below are plain pointers owned by the wrappers in `super`.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

pub type RadosT = *mut c_void;
pub type RadosIoctxT = *mut c_void;
pub type RbdImageT = *mut c_void;
pub type RbdCompletionT = *mut c_void;
pub type RbdCallbackT = unsafe extern "C" fn(RbdCompletionT, *mut c_void);

/// `rbd_image_info_t` (librbd.h).
#[repr(C)]
pub struct RbdImageInfo {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; 24],
    pub parent_pool: i64,
    pub parent_name: [c_char; 96],
}

/// The entry points, resolved once.
pub struct Lib {
    pub rados_create: unsafe extern "C" fn(*mut RadosT, *const c_char) -> c_int,
    pub rados_conf_read_file: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    pub rados_conf_parse_env: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    pub rados_conf_set: unsafe extern "C" fn(RadosT, *const c_char, *const c_char) -> c_int,
    pub rados_conf_get: unsafe extern "C" fn(RadosT, *const c_char, *mut c_char, usize) -> c_int,
    pub rados_connect: unsafe extern "C" fn(RadosT) -> c_int,
    pub rados_shutdown: unsafe extern "C" fn(RadosT),
    pub rados_ioctx_create: unsafe extern "C" fn(RadosT, *const c_char, *mut RadosIoctxT) -> c_int,
    pub rados_ioctx_destroy: unsafe extern "C" fn(RadosIoctxT),
    pub rados_ioctx_set_namespace: unsafe extern "C" fn(RadosIoctxT, *const c_char),
    pub rbd_open:
        unsafe extern "C" fn(RadosIoctxT, *const c_char, *mut RbdImageT, *const c_char) -> c_int,
    pub rbd_open_read_only:
        unsafe extern "C" fn(RadosIoctxT, *const c_char, *mut RbdImageT, *const c_char) -> c_int,
    pub rbd_close: unsafe extern "C" fn(RbdImageT) -> c_int,
    pub rbd_stat: unsafe extern "C" fn(RbdImageT, *mut RbdImageInfo, usize) -> c_int,
    pub rbd_get_size: unsafe extern "C" fn(RbdImageT, *mut u64) -> c_int,
    pub rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, RbdCallbackT, *mut RbdCompletionT) -> c_int,
    pub rbd_aio_get_return_value: unsafe extern "C" fn(RbdCompletionT) -> isize,
    pub rbd_aio_release: unsafe extern "C" fn(RbdCompletionT),
    pub rbd_aio_readv:
        unsafe extern "C" fn(RbdImageT, *const libc::iovec, c_int, u64, RbdCompletionT) -> c_int,
    pub rbd_aio_writev:
        unsafe extern "C" fn(RbdImageT, *const libc::iovec, c_int, u64, RbdCompletionT) -> c_int,
    pub rbd_aio_discard: unsafe extern "C" fn(RbdImageT, u64, u64, RbdCompletionT) -> c_int,
    pub rbd_aio_flush: unsafe extern "C" fn(RbdImageT, RbdCompletionT) -> c_int,
}

/// The shared objects, by their Debian package's soname.
pub const LIBRBD: &str = "librbd.so.1";
pub const LIBRADOS: &str = "librados.so.2";

static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();

/// The loaded libraries, or why they cannot be loaded (the same answer every time).
pub fn lib() -> Result<&'static Lib, String> {
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn dlerror() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string valid until the next dl*
    // call on this thread; it is copied at once.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".to_string()
    } else {
        // SAFETY: non-NULL, NUL-terminated (see above).
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

fn open(name: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: `name` is a NUL-terminated string; the handle is kept for the life of the
    // process (never dlclosed: librbd's threads and static state must outlive every use).
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return Err(format!(
            "cannot load {} ({}); install Debian's librbd1 (e.g. with ceph-common)",
            name.to_string_lossy(),
            dlerror()
        ));
    }
    Ok(handle)
}

/// The function `name` of a loaded library, as the function-pointer type `F`.
///
/// # Safety
/// `handle` is a live dlopen handle and `F` is the `unsafe extern "C" fn` type of the C
/// function `name` (its prototype in librbd.h / librados.h).
unsafe fn symbol<F: Copy>(handle: *mut c_void, library: &str, name: &CStr) -> Result<F, String> {
    // SAFETY: `name` is NUL-terminated; the handle is live (caller).
    let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
    if p.is_null() {
        return Err(format!(
            "{library} has no symbol {} ({})",
            name.to_string_lossy(),
            dlerror()
        ));
    }
    const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<*mut c_void>()) };
    // SAFETY: `p` is the address of the C function `name`, whose type is `F` (caller);
    // function and data pointers have the same size and representation on Linux.
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
}

fn load() -> Result<Lib, String> {
    let rados = open(c"librados.so.2")?;
    let rbd = open(c"librbd.so.1")?;
    macro_rules! sym {
        ($handle:expr, $name:ident) => {{
            let lib = if $handle == rbd { LIBRBD } else { LIBRADOS };
            let name = concat!(stringify!($name), "\0");
            let name = CStr::from_bytes_with_nul(name.as_bytes()).map_err(|e| e.to_string())?;
            // SAFETY: a live handle; the field this initialises has the function's
            // prototype as its type (checked by hand against Ceph 16's headers).
            unsafe { symbol($handle, lib, name)? }
        }};
    }
    Ok(Lib {
        rados_create: sym!(rados, rados_create),
        rados_conf_read_file: sym!(rados, rados_conf_read_file),
        rados_conf_parse_env: sym!(rados, rados_conf_parse_env),
        rados_conf_set: sym!(rados, rados_conf_set),
        rados_conf_get: sym!(rados, rados_conf_get),
        rados_connect: sym!(rados, rados_connect),
        rados_shutdown: sym!(rados, rados_shutdown),
        rados_ioctx_create: sym!(rados, rados_ioctx_create),
        rados_ioctx_destroy: sym!(rados, rados_ioctx_destroy),
        rados_ioctx_set_namespace: sym!(rados, rados_ioctx_set_namespace),
        rbd_open: sym!(rbd, rbd_open),
        rbd_open_read_only: sym!(rbd, rbd_open_read_only),
        rbd_close: sym!(rbd, rbd_close),
        rbd_stat: sym!(rbd, rbd_stat),
        rbd_get_size: sym!(rbd, rbd_get_size),
        rbd_aio_create_completion: sym!(rbd, rbd_aio_create_completion),
        rbd_aio_get_return_value: sym!(rbd, rbd_aio_get_return_value),
        rbd_aio_release: sym!(rbd, rbd_aio_release),
        rbd_aio_readv: sym!(rbd, rbd_aio_readv),
        rbd_aio_writev: sym!(rbd, rbd_aio_writev),
        rbd_aio_discard: sym!(rbd, rbd_aio_discard),
        rbd_aio_flush: sym!(rbd, rbd_aio_flush),
    })
}
