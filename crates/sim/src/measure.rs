//! Counts that do not depend on machine noise, for benchmarks: system calls
//! and context switches of chosen threads of this process over a window.
//! System calls are counted exactly by the kernel's `raw_syscalls:sys_enter`
//! tracepoint through `perf_event_open` (one counter per thread; needs
//! tracefs and the right to open tracepoint events, i.e. root or
//! `kernel.perf_event_paranoid` <= -1); context switches come from each
//! thread's `/proc/self/task/<tid>/status`.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `PERF_TYPE_TRACEPOINT` (`linux/perf_event.h`).
const PERF_TYPE_TRACEPOINT: u32 = 2;
/// `PERF_FLAG_FD_CLOEXEC`.
const PERF_FLAG_FD_CLOEXEC: nix::libc::c_ulong = 8;
/// `PERF_EVENT_IOC_SET_FILTER`: `_IOW('$', 6, char *)`.
const PERF_EVENT_IOC_SET_FILTER: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_write!(b'$', 6, core::mem::size_of::<*const u8>());

/// `struct perf_event_attr` up to `PERF_ATTR_SIZE_VER5` (112 bytes); the
/// kernel takes the size from `size` and zero-fills the rest.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// The bitfield word (`disabled`, `inherit`, ... `exclude_kernel` ...):
    /// all 0 here, so counting starts at once and includes the kernel.
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved_2: u16,
}

const _: () = assert!(core::mem::size_of::<PerfEventAttr>() == 112);
const _: () = assert!(core::mem::offset_of!(PerfEventAttr, config) == 8);
const _: () = assert!(core::mem::offset_of!(PerfEventAttr, flags) == 40);
const _: () = assert!(core::mem::offset_of!(PerfEventAttr, config1) == 56);
const _: () = assert!(core::mem::offset_of!(PerfEventAttr, sample_regs_intr) == 96);

/// Where the tracepoint's id is, with or without debugfs.
const SYS_ENTER_ID: [&str; 2] = [
    "/sys/kernel/tracing/events/raw_syscalls/sys_enter/id",
    "/sys/kernel/debug/tracing/events/raw_syscalls/sys_enter/id",
];

/// One thread's counters.
struct Thread {
    tid: u32,
    syscalls: Option<File>,
    switches: (u64, u64),
}

/// Counters on the threads of this process whose name (`comm`) a filter
/// chose, from [`ThreadCounters::start`] to [`ThreadCounters::read`].
pub struct ThreadCounters {
    threads: Vec<Thread>,
    /// Why system calls are not counted, if they are not.
    no_syscalls: Option<String>,
}

/// What the chosen threads did in the window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Threads counted.
    pub threads: usize,
    /// System calls (`None`: could not be counted, see `why_not`).
    pub syscalls: Option<u64>,
    /// Voluntary context switches (the thread blocked).
    pub voluntary: u64,
    /// Involuntary context switches (preempted).
    pub involuntary: u64,
    /// Why system calls are not counted.
    pub why_not: Option<String>,
}

fn thread_names() -> std::io::Result<Vec<(u32, String)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else { continue };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        out.push((tid, comm.trim_end().to_string()));
    }
    Ok(out)
}

/// `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` of `tid`
/// (zeros once the thread is gone).
fn switches(tid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim_start_matches(':').trim().parse().ok())
            .unwrap_or(0)
    };
    (field("voluntary_ctxt_switches"), field("nonvoluntary_ctxt_switches"))
}

fn sys_enter_id() -> Result<u64, String> {
    for path in SYS_ENTER_ID {
        if let Ok(text) = std::fs::read_to_string(path) {
            return text.trim().parse().map_err(|e| format!("{path}: {e}"));
        }
    }
    Err("tracefs is not mounted (mount -t tracefs nodev /sys/kernel/tracing)".into())
}

/// A counter of `tracepoint` events of thread `tid`, only those that pass
/// `filter` (the tracepoint's filter language, e.g. `id == 17`) if given.
fn open_counter(tracepoint: u64, tid: u32, filter: Option<&str>) -> std::io::Result<File> {
    let attr = PerfEventAttr {
        type_: PERF_TYPE_TRACEPOINT,
        size: core::mem::size_of::<PerfEventAttr>() as u32,
        config: tracepoint,
        sample_period: 1,
        ..Default::default()
    };
    // SAFETY: perf_event_open reads `size` bytes of the attribute struct,
    // which lives across the call; the other arguments are plain values.
    let fd = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            tid as nix::libc::pid_t,
            -1 as nix::libc::c_int,
            -1 as nix::libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor, owned by no one else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    if let Some(filter) = filter {
        let text = std::ffi::CString::new(filter).map_err(std::io::Error::other)?;
        // SAFETY: the ioctl reads the NUL-terminated string, alive across the call.
        let rc = unsafe { nix::libc::ioctl(file.as_raw_fd(), PERF_EVENT_IOC_SET_FILTER as _, text.as_ptr()) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(file)
}

impl ThreadCounters {
    /// Starts counting on every thread whose name `choose` accepts. Threads
    /// started later are not counted: start once the threads exist.
    pub fn start(choose: impl Fn(&str) -> bool) -> std::io::Result<ThreadCounters> {
        Self::start_filtered(choose, None)
    }

    /// [`ThreadCounters::start`], counting only the system calls that pass
    /// `filter`, e.g. [`syscall_filter`]`(&[SYS_pread64])`.
    pub fn start_filtered(choose: impl Fn(&str) -> bool, filter: Option<&str>) -> std::io::Result<ThreadCounters> {
        let id = sys_enter_id();
        let mut no_syscalls = id.as_ref().err().cloned();
        let mut threads = Vec::new();
        for (tid, name) in thread_names()? {
            if !choose(&name) {
                continue;
            }
            let syscalls = match &id {
                Ok(id) => match open_counter(*id, tid, filter) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        no_syscalls.get_or_insert(format!("perf_event_open: {e}"));
                        None
                    }
                },
                Err(_) => None,
            };
            threads.push(Thread { tid, syscalls, switches: switches(tid) });
        }
        Ok(ThreadCounters { threads, no_syscalls })
    }

    /// The counts since [`ThreadCounters::start`].
    pub fn read(&mut self) -> Counts {
        let mut c = Counts { threads: self.threads.len(), why_not: self.no_syscalls.clone(), ..Counts::default() };
        let mut syscalls = Some(0u64);
        for t in &mut self.threads {
            let (v, i) = switches(t.tid);
            c.voluntary += v.saturating_sub(t.switches.0);
            c.involuntary += i.saturating_sub(t.switches.1);
            let mut buf = [0u8; 8];
            let n = t.syscalls.as_mut().and_then(|f| f.read_exact(&mut buf).ok()).map(|()| u64::from_ne_bytes(buf));
            syscalls = syscalls.zip(n).map(|(a, b)| a + b);
        }
        c.syscalls = if self.no_syscalls.is_some() { None } else { syscalls };
        c
    }
}

/// Pins thread `tid` of this process (0: the calling thread) to `cpu`.
pub fn pin_thread(tid: u32, cpu: usize) -> std::io::Result<()> {
    // SAFETY: a cpu_set_t is plain data; all zeros is the empty set.
    let mut set: nix::libc::cpu_set_t = unsafe { core::mem::zeroed() };
    if cpu >= 8 * core::mem::size_of::<nix::libc::cpu_set_t>() {
        return Err(std::io::Error::from_raw_os_error(nix::libc::EINVAL));
    }
    // SAFETY: `cpu` is within the set (checked above); `set` is ours.
    unsafe { nix::libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the kernel reads `size_of_val(&set)` bytes from a valid
    // cpu_set_t; a tid of another process is refused by the kernel's checks
    // like any caller's.
    let rc = unsafe { nix::libc::sched_setaffinity(tid as nix::libc::pid_t, core::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Pins every thread of this process whose name `choose` accepts to
/// `cpu`; returns how many. Threads started later are not pinned.
pub fn pin_threads(choose: impl Fn(&str) -> bool, cpu: usize) -> std::io::Result<usize> {
    let mut pinned = 0;
    for (tid, name) in thread_names()? {
        if choose(&name) {
            pin_thread(tid, cpu)?;
            pinned += 1;
        }
    }
    Ok(pinned)
}

/// Puts the calling thread in `SCHED_IDLE`: it runs only when its CPU has
/// nothing else to run. A benchmark's simulated guest that spins (an
/// attacker) then takes no CPU from a measured thread beside it, as a real
/// guest's vCPUs, scheduled by Xen on their own pCPUs, would not.
pub fn idle_priority() -> std::io::Result<()> {
    // SAFETY: sched_param is plain data (musl's has more fields than
    // glibc's); all zeros is priority 0, the only one SCHED_IDLE takes.
    let param: nix::libc::sched_param = unsafe { core::mem::zeroed() };
    // SAFETY: `param` is a valid sched_param for the call's duration; pid 0
    // is the calling thread.
    let rc = unsafe { nix::libc::sched_setscheduler(0, nix::libc::SCHED_IDLE, &param) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A tracepoint filter that passes the system calls numbered `ids`
/// (`nix::libc::SYS_*`).
pub fn syscall_filter(ids: &[nix::libc::c_long]) -> String {
    ids.iter().map(|id| format!("id == {id}")).collect::<Vec<_>>().join(" || ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_a_named_thread_and_idles_the_caller() {
        let (done, finished) = std::sync::mpsc::channel::<(String, String)>();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("measure-pin".into())
            .spawn(move || {
                idle_priority().unwrap();
                // Pinned by the main thread, by name, before this returns.
                stopped.recv().unwrap();
                let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
                let cpus =
                    status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap().trim().to_string();
                // Field 41 of stat is the scheduling policy (SCHED_IDLE = 5).
                let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
                let policy = stat.rsplit_once(')').unwrap().1.split_whitespace().nth(38).unwrap().to_string();
                done.send((cpus, policy)).unwrap();
            })
            .unwrap();
        // Wait until the thread is named (its name is set as it starts).
        while !thread_names().unwrap().iter().any(|(_, n)| n == "measure-pin") {
            std::thread::yield_now();
        }
        assert_eq!(pin_threads(|n| n == "measure-pin", 0).unwrap(), 1);
        stop.send(()).unwrap();
        let (cpus, policy) = finished.recv().unwrap();
        t.join().unwrap();
        assert_eq!(cpus, "0");
        assert_eq!(policy, nix::libc::SCHED_IDLE.to_string());
    }

    #[test]
    fn counts_the_system_calls_and_switches_of_a_chosen_thread() {
        let (go, wait) = std::sync::mpsc::channel::<u32>();
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let t = std::thread::Builder::new()
            .name("measure-probe".into())
            .spawn(move || {
                // Named by now (the name is set as the thread starts).
                done.send(()).unwrap();
                for n in wait {
                    for _ in 0..n {
                        // One system call each.
                        let _ = nix::unistd::getppid();
                        let _ = std::fs::metadata("/");
                    }
                    // Blocks: a voluntary context switch.
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    done.send(()).unwrap();
                }
            })
            .unwrap();
        finished.recv().unwrap();
        let mut counters = ThreadCounters::start(|name| name == "measure-probe").unwrap();
        let only = syscall_filter(&[nix::libc::SYS_getppid]);
        let mut getppid = ThreadCounters::start_filtered(|name| name == "measure-probe", Some(&only)).unwrap();
        go.send(1000).unwrap();
        finished.recv().unwrap();
        let c = counters.read();
        if let Some(n) = getppid.read().syscalls {
            assert_eq!(n, 1000, "only getppid passes the filter");
        }
        assert_eq!(c.threads, 1);
        match c.syscalls {
            // getppid plus statx each, and the channel's futex calls.
            Some(n) => assert!((2000..2100).contains(&n), "{n} system calls for 2000"),
            None => eprintln!("system calls not counted here: {:?}", c.why_not),
        }
        assert!(c.voluntary >= 1, "the thread slept: {c:?}");
        drop(go);
        t.join().unwrap();
    }
}
