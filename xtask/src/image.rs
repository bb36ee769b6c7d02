//! `cargo xtask image`: the DaemonSet's container image.
//!
//! No registry can be reached from the machines that build xlb, so the image has no base to
//! pull: it is `FROM scratch` around one static binary (deploy/Dockerfile). The binary is the
//! release build of `xlb` for the musl target, statically linked, so it needs no loader and no
//! libc in the image. The eBPF object is embedded in it (lb-userspace/build.rs), and the agent
//! calls no other program, so the binary is all the image carries.
//!
//! Steps: `cargo build --release --locked --target x86_64-unknown-linux-musl -p lb-userspace
//! --bin xlb`; check the result has no ELF interpreter (static); copy it alone into
//! `target/image/` (the build context, so nothing else of the tree is sent to the builder);
//! `podman build -f deploy/Dockerfile` with the commit's time as the image timestamp (the same
//! binary gives the same image id) and the commit as a label; remove the dangling images earlier
//! builds of the same tag left behind.
//!
//! `cargo xtask test` runs this before the tests and hands the image id to the image test
//! (tests/tests/e2e_image.rs) as `XLB_IMAGE`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context as _, Result};

use crate::build::{cargo, target_dir, workspace_root};

/// The Rust target of the image's binary: static with musl's libc.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// The tag `cargo xtask image` gives when none is named (the image test's default too).
pub const DEFAULT_TAG: &str = "localhost/xlb:latest";
/// Label on every image this builds, so pruning only ever touches xlb's own dangling images.
const IMAGE_LABEL: &str = "io.xlb.image=agent";

/// An image that was built.
#[derive(Debug)]
pub struct Built {
    /// The image id (what `podman run` accepts, whatever the tags).
    pub id: String,
    pub tags: Vec<String>,
    /// The static binary inside it.
    pub binary: PathBuf,
}

/// `cargo xtask image [--tag T]...`: setup, build, print what was built and how to push it.
pub fn image(tags: &[String]) -> Result<()> {
    crate::setup::setup()?;
    let tags = if tags.is_empty() {
        vec![DEFAULT_TAG.to_string()]
    } else {
        tags.to_vec()
    };
    let built = build(&tags)?;
    let size = std::fs::metadata(&built.binary).map_or(0, |m| m.len());
    println!(
        "image: {} tagged {} ({}, {:.1} MiB)",
        built.id,
        built.tags.join(", "),
        built.binary.display(),
        size as f64 / (1024.0 * 1024.0)
    );
    println!(
        "image: push with `podman push {} REGISTRY/xlb:VERSION` and set that reference in \
         deploy/daemonset.yaml",
        built.tags[0]
    );
    Ok(())
}

/// Build the static binary and the image, tagged `tags` (at least one).
pub fn build(tags: &[String]) -> Result<Built> {
    ensure!(!tags.is_empty(), "an image needs at least one tag");
    let binary = build_static_xlb()?;
    let context = target_dir().join("image");
    std::fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
    let staged = context.join("xlb");
    std::fs::copy(&binary, &staged)
        .with_context(|| format!("copying {} to {}", binary.display(), staged.display()))?;

    // The commit, marked when the tree has changes the commit does not hold.
    let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some();
    let revision = git(&["rev-parse", "HEAD"]).map_or_else(
        || "unknown".to_string(),
        |h| if dirty { format!("{h}-dirty") } else { h },
    );
    let timestamp = git(&["log", "-1", "--format=%ct"]).unwrap_or_else(|| "0".into());
    let dockerfile = workspace_root().join("deploy/Dockerfile");
    let started = Instant::now();
    let mut cmd = Command::new("podman");
    cmd.arg("build")
        .arg("--file")
        .arg(&dockerfile)
        .args(["--timestamp", &timestamp])
        // No intermediate images kept as a cache: every step but COPY is metadata, and each
        // cached one would pin a copy of an old binary.
        .arg("--layers=false")
        .args(["--build-arg", &format!("REVISION={revision}")])
        .args(["--label", IMAGE_LABEL])
        .args(["--iidfile"])
        .arg(context.join("iid"));
    for t in tags {
        cmd.args(["--tag", t]);
    }
    cmd.arg(&context);
    println!(
        "image: podman build -f deploy/Dockerfile {}",
        context.display()
    );
    let status = cmd
        .status()
        .context("running podman (install it with `cargo xtask setup`)")?;
    if !status.success() {
        bail!("podman build failed ({status})");
    }
    let id = std::fs::read_to_string(context.join("iid"))
        .context("reading the image id podman wrote")?
        .trim()
        .to_string();
    println!(
        "image: podman build took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // Earlier builds of the same tags are left untagged; only ours (the label) are removed.
    let _ = Command::new("podman")
        .args(["image", "prune", "--force", "--filter"])
        .arg(format!("label={IMAGE_LABEL}"))
        .output();
    Ok(Built {
        id,
        tags: tags.to_vec(),
        binary,
    })
}

/// `cargo build --release --locked --target x86_64-unknown-linux-musl -p lb-userspace --bin
/// xlb`, timed (the CI budget); returns the binary after checking it is static.
pub fn build_static_xlb() -> Result<PathBuf> {
    println!("image: cargo build --release --target {MUSL_TARGET} -p lb-userspace --bin xlb");
    let started = Instant::now();
    let status = cargo()
        .args(["build", "--release", "--locked", "--target", MUSL_TARGET])
        .args(["-p", "lb-userspace", "--bin", "xlb"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!(
            "cargo build --target {MUSL_TARGET} failed ({status}); `cargo xtask setup` installs \
             the target and musl-tools"
        );
    }
    println!(
        "image: musl release build took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let bin = target_dir().join(MUSL_TARGET).join("release/xlb");
    let bytes = std::fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    match elf_interpreter(&bytes) {
        Ok(false) => Ok(bin),
        Ok(true) => bail!(
            "{} asks for a dynamic loader: it would not start in a FROM scratch image",
            bin.display()
        ),
        Err(e) => bail!("{}: {e}", bin.display()),
    }
}

/// Whether a 64-bit little-endian ELF file has a program interpreter (`PT_INTERP`), i.e. needs
/// a dynamic loader. Static and static-pie executables have none.
fn elf_interpreter(elf: &[u8]) -> Result<bool, String> {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("not an ELF file".into());
    }
    if elf.get(4..6) != Some([2u8, 1].as_slice()) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let truncated = || "truncated ELF header".to_string();
    let phoff = usize::try_from(u64_at(0x20).ok_or_else(truncated)?).map_err(|e| e.to_string())?;
    let phentsize = usize::from(u16_at(0x36).ok_or_else(truncated)?);
    let phnum = usize::from(u16_at(0x38).ok_or_else(truncated)?);
    for i in 0..phnum {
        let p_type = u32_at(phoff + i * phentsize).ok_or("truncated program headers")?;
        if p_type == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `git ARGS` in the workspace, trimmed stdout; None when git fails (e.g. no repository).
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(workspace_root())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 LE header with the given program header types.
    fn elf_with(types: &[u32]) -> Vec<u8> {
        let mut e = vec![0u8; 64];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2;
        e[5] = 1;
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            e.extend(ph);
        }
        e
    }

    #[test]
    fn a_loader_request_is_found_among_the_program_headers() {
        // PT_PHDR, PT_INTERP, PT_LOAD: a dynamically linked executable.
        assert_eq!(elf_interpreter(&elf_with(&[6, 3, 1])), Ok(true));
        // PT_LOAD, PT_DYNAMIC, PT_GNU_STACK: static-pie, no loader.
        assert_eq!(elf_interpreter(&elf_with(&[1, 2, 0x6474_e551])), Ok(false));
        assert!(elf_interpreter(b"#!/bin/sh\n").is_err());
        let mut cut = elf_with(&[1, 3]);
        cut.truncate(64 + 56);
        assert!(elf_interpreter(&cut).is_err());
    }

    #[test]
    fn this_test_binary_is_dynamically_linked() {
        // The host (gnu) build of this very test uses the loader: the check sees it.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_interpreter(&me), Ok(true));
    }
}
