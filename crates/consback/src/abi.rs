//! The console ABI: the page (`struct xencons_interface`, `io/console.h`)
//! is `xen_ring::abi`'s, its one home, re-exported here; this adds the
//! constants of the other headers a console backend needs.

use gnttab::GrantRef;

pub use xen_ring::abi::{XenconsInterface, XENCONS_CONNECTION, XENCONS_IN, XENCONS_OUT};

/// `GNTTAB_RESERVED_CONSOLE` (`grant_table.h`): the grant reference at which
/// the domain builder grants a guest's primary console page to the console
/// backend's domain (`xc_dom_gnttab_init`), so it maps without foreign
/// memory access (privcmd).
pub const GNTTAB_RESERVED_CONSOLE: GrantRef = GrantRef(0);

/// `XENCONSOLE_CONNECTED` (newer `io/console.h`): the backend serves the page.
pub const XENCONSOLE_CONNECTED: u8 = 0;
/// `XENCONSOLE_DISCONNECTED`: the page is not served (yet).
pub const XENCONSOLE_DISCONNECTED: u8 = 1;

/// `LIBXL_XENCONSOLE_LIMIT` (`libxl_internal.h`): the `limit` libxl writes.
pub const LIBXL_XENCONSOLE_LIMIT: usize = 1_048_576;

/// `LIBXL_XENCONSOLE_PROTOCOL`: the backend's `protocol` node.
pub const LIBXL_XENCONSOLE_PROTOCOL: &str = "vt100";

// The page fits one grant, with the flag byte after the four indices.
const _: () = assert!(core::mem::size_of::<XenconsInterface>() <= 4096);
const _: () = assert!(XENCONS_CONNECTION == 3088);
const _: () = assert!(XENCONS_IN.size == 1024 && XENCONS_OUT.size == 2048);

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles a C program against the installed `grant_table.h` and
    /// `io/console.h` (skipped when absent) and compares the constants.
    #[test]
    #[cfg_attr(miri, ignore = "runs the C compiler")]
    fn constants_match_the_c_headers_when_installed() {
        let gnttab = std::path::Path::new("/usr/include/xen/grant_table.h");
        let Ok(console) = std::fs::read_to_string("/usr/include/xen/io/console.h") else {
            eprintln!("skipped: /usr/include/xen/io/console.h not installed (apt-get install libxen-dev)");
            return;
        };
        if !gnttab.exists() {
            eprintln!("skipped: {} not installed", gnttab.display());
            return;
        }
        // Older headers have no connection flag: compare it only where present.
        let flags = if console.contains("XENCONSOLE_CONNECTED") {
            "printf(\" %d %d\", XENCONSOLE_CONNECTED, XENCONSOLE_DISCONNECTED);"
        } else {
            "printf(\" 0 1\");"
        };
        let source = format!(
            "#include <stdint.h>\n#include <stdio.h>\n#include <xen/xen.h>\n#include <xen/grant_table.h>\n\
             #include <xen/io/console.h>\nint main(void) {{ printf(\"%d %zu\", GNTTAB_RESERVED_CONSOLE, \
             sizeof(struct xencons_interface) >= 3088 ? (size_t)3088 : (size_t)0); {flags} printf(\"\\n\"); return 0; }}\n"
        );
        let dir = std::env::temp_dir().join(format!("consback-abi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("t.c"), source).unwrap();
        let Ok(status) = std::process::Command::new("cc").arg("-o").arg(dir.join("t")).arg(dir.join("t.c")).status()
        else {
            eprintln!("skipped: no C compiler");
            return;
        };
        assert!(status.success(), "compiling against the Xen headers failed");
        let out = std::process::Command::new(dir.join("t")).output().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let want = format!(
            "{} {XENCONS_CONNECTION} {XENCONSOLE_CONNECTED} {XENCONSOLE_DISCONNECTED}\n",
            GNTTAB_RESERVED_CONSOLE.0
        );
        assert_eq!(String::from_utf8(out.stdout).unwrap(), want);
    }
}
