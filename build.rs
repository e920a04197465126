//! Link-time layout of the release binary: the functions that serve a proxied request are
//! placed side by side, in the order `link/hot-symbols.txt` lists them (lld's
//! `--symbol-ordering-file`), at the start of the text. Left where the linker puts them, the
//! functions listed spread over 168 pages of a 13 MiB text; side by side they take 95, so a
//! request touches fewer pages (measured in the README's Gateway section). Regenerate the list
//! with `scripts/hot-symbols.sh` after a change of dependencies or toolchain, or of a listed
//! function's signature (`--check` tells): a name that no longer exists is skipped, so a stale
//! list costs speed, never a build.
//!
//! Only for release builds of the x86_64 glibc target, which links with rust-lld by default;
//! `APIM_NO_SYMBOL_ORDER=1` leaves the layout to the linker (for a linker other than lld).
use std::path::Path;

fn main() {
    let list = Path::new("link/hot-symbols.txt");
    println!("cargo:rerun-if-changed={}", list.display());
    println!("cargo:rerun-if-env-changed=APIM_NO_SYMBOL_ORDER");
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    if env("PROFILE") != "release"
        || env("TARGET") != "x86_64-unknown-linux-gnu"
        || !env("APIM_NO_SYMBOL_ORDER").is_empty()
        || !list.exists()
    {
        return;
    }
    // (the manifest's directory: the linker does not run from it)
    let list = Path::new(&env("CARGO_MANIFEST_DIR")).join(list);
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
        list.display()
    );
    // names the build does not have (another toolchain, other dependencies) are skipped
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}
