//! Handing the memory a cold start freed back to the OS (glibc).
//!
//! A cold start decodes every object of the cluster at once (10k Services, 100k endpoints:
//! ~40 MB of YAML or JSON) on several threads and keeps a compact copy; the decoded objects and
//! the large temporaries of the first sync are then freed. glibc keeps freed memory for reuse:
//! `malloc_trim(0)` returns the whole free pages inside free chunks of every arena and the free
//! top of the main one, but not the free top of another thread's arena, which glibc trims only
//! when a free leaves more than `M_TRIM_THRESHOLD` there. That threshold starts at 128 KiB and
//! grows with the largest block freed (up to 64 MiB). At 10k Services from manifests, fixing it
//! at 1 MiB measured ~99 instead of ~107 MiB resident when ready.

/// Free space glibc may keep at the top of an arena. Fixed (which also keeps large blocks,
/// from 128 KiB, in their own mappings, returned when freed) rather than growing with the
/// program's largest frees.
#[cfg(target_env = "gnu")]
const TRIM_THRESHOLD: libc::c_int = 1 << 20;

/// Set glibc's trimming policy ([`TRIM_THRESHOLD`]); at start, before the cold start's threads.
pub fn set_trim_policy() {
    // SAFETY: mallopt only changes glibc's trimming policy.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Return the memory freed since the program started to the OS, as far as glibc allows.
/// Meant for once after the first sync (it walks every free chunk).
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only releases free heap memory.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}
