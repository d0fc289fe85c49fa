// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The set of vCPUs of one VM: creation, hot-add (reusing parked fds), hot-remove (parking),
//! pause/resume of all, and save of all.

use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, CpuId, Msrs,
    KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::{VcpuFd, VmFd};
use lapic_state::{KvmConventions, LapicPage};

use crate::exit::ExitHandler;
use crate::options::{RestoreOptions, SaveOptions, TscPolicy};
use crate::runner::VcpuRunner;
use crate::state::{save_vcpu, VcpuState, MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_WB};
use crate::{cpuid, Error, Result, Topology};

/// How long a vCPU may take to acknowledge a pause or answer a request.
pub const VCPU_TIMEOUT: Duration = Duration::from_secs(5);

/// What a possible CPU's slot holds.
#[derive(Debug)]
pub enum Slot {
    /// No vCPU was ever created for it.
    Absent,
    /// A vCPU thread runs it.
    Running(VcpuRunner),
    /// Removed: its fd is kept for reuse (KVM cannot destroy a vCPU).
    Parked(VcpuFd),
}

/// Power-on register state captured right after `KVM_CREATE_VCPU`, to reset a parked vCPU.
#[derive(Clone, Copy)]
struct PowerOn {
    regs: kvm_regs,
    sregs: kvm_sregs,
}

/// vCPUs of one VM.
pub struct VcpuManager {
    topology: Topology,
    cpuid: CpuId,
    handler: Arc<dyn ExitHandler>,
    conv: KvmConventions,
    slots: Vec<Slot>,
    power_on: Vec<Option<PowerOn>>,
    /// The CPUID set on each created vCPU (what its state saves).
    cpuids: Vec<Option<CpuId>>,
    reused: u64,
    tsc_khz: Option<u32>,
    /// The VM's XSAVE area size (`None`: legacy ioctls), learnt when a vCPU is prepared.
    xsave_size: Option<usize>,
}

impl std::fmt::Debug for VcpuManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuManager").field("slots", &self.slots).finish()
    }
}

/// MTRRs as firmware leaves them (all RAM write-back); every CPU the same, as Linux checks.
fn set_mtrr_default(fd: &VcpuFd) -> Result<()> {
    let mtrr = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_MTRR_DEF_TYPE,
        data: MTRR_DEF_TYPE_WB,
        ..Default::default()
    }])
    .map_err(|_| Error::Msrs("building the MTRR default type"))?;
    match fd.set_msrs(&mtrr).map_err(ioctl("KVM_SET_MSRS"))? {
        1 => Ok(()),
        _ => Err(Error::Msrs("KVM refused the MTRR default type")),
    }
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

impl VcpuManager {
    /// A manager for `topology`'s possible CPUs, with the host's supported CPUID, sending
    /// exits to `handler`, using `conv` for LAPIC state.
    pub fn new(
        topology: Topology,
        supported_cpuid: CpuId,
        handler: Arc<dyn ExitHandler>,
        conv: KvmConventions,
    ) -> Self {
        let n = topology.max_vcpus() as usize;
        VcpuManager {
            topology,
            cpuid: supported_cpuid,
            handler,
            conv,
            slots: (0..n).map(|_| Slot::Absent).collect(),
            power_on: vec![None; n],
            cpuids: vec![None; n],
            reused: 0,
            tsc_khz: None,
            xsave_size: None,
        }
    }

    /// The topology.
    pub fn topology(&self) -> Topology {
        self.topology
    }

    /// LAPIC conventions in use.
    pub fn conventions(&self) -> KvmConventions {
        self.conv
    }

    /// Replace the LAPIC conventions (once they have been detected on a real vCPU).
    pub fn set_conventions(&mut self, conv: KvmConventions) {
        self.conv = conv;
    }

    /// The guest TSC frequency of the VM (kHz); `None`: KVM's default, this host's.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.tsc_khz
    }

    /// Make `khz` the VM's TSC frequency for every vCPU created from now on (hot-added ones
    /// included): a VM restored or migrated from another host keeps its own rate.
    pub fn set_tsc_khz(&mut self, khz: Option<u32>) {
        self.tsc_khz = khz;
    }

    /// The VM's XSAVE area size in bytes, or `None` for KVM's legacy 4 KiB ioctls (also
    /// before the first vCPU was prepared).
    pub fn xsave_size(&self) -> Option<usize> {
        self.xsave_size
    }

    /// Slot of CPU `index`.
    pub fn slot(&self, index: u32) -> Option<&Slot> {
        self.slots.get(index as usize)
    }

    /// The runner of CPU `index`, if it runs.
    pub fn runner(&self, index: u32) -> Option<&VcpuRunner> {
        match self.slots.get(index as usize) {
            Some(Slot::Running(r)) => Some(r),
            _ => None,
        }
    }

    /// Indices of running vCPUs.
    pub fn running(&self) -> Vec<u32> {
        (0..self.slots.len() as u32)
            .filter(|i| self.runner(*i).is_some())
            .collect()
    }

    /// Number of parked fds.
    pub fn parked(&self) -> usize {
        self.slots.iter().filter(|s| matches!(s, Slot::Parked(_))).count()
    }

    /// The CPUID set on CPU `index`'s vCPU (by [`VcpuManager::prepare`] or recorded with
    /// [`VcpuManager::record_cpuid`] after a restore).
    pub fn cpuid(&self, index: u32) -> Option<&CpuId> {
        self.cpuids.get(index as usize)?.as_ref()
    }

    /// Record that CPU `index`'s vCPU now has `cpuid` (a restore set the saved one).
    pub fn record_cpuid(&mut self, index: u32, cpuid: CpuId) {
        if let Some(c) = self.cpuids.get_mut(index as usize) {
            *c = Some(cpuid);
        }
    }

    /// How many hot-adds reused a parked fd.
    pub fn reused(&self) -> u64 {
        self.reused
    }

    /// A configured vCPU fd for CPU `index`: a new one (CPUID, LAPIC LINT wiring), or the
    /// parked one reset to an AP's power-on state. Not started yet.
    pub fn prepare(&mut self, vm: &VmFd, index: u32) -> Result<VcpuFd> {
        self.xsave_size = crate::state::xsave_size(vm);
        let i = index as usize;
        let slot = self.slots.get_mut(i).ok_or(Error::NoSuchCpu(index))?;
        match std::mem::replace(slot, Slot::Absent) {
            Slot::Running(r) => {
                *slot = Slot::Running(r);
                Err(Error::AlreadyRunning(index))
            }
            Slot::Parked(fd) => {
                if let Err(e) = self.reset_to_power_on(&fd, index) {
                    self.slots[i] = Slot::Parked(fd);
                    return Err(e);
                }
                self.reused += 1;
                Ok(fd)
            }
            Slot::Absent => {
                let fd = vm
                    .create_vcpu(u64::from(self.topology.apic_id(index)))
                    .map_err(ioctl("KVM_CREATE_VCPU"))?;
                let regs = fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
                let sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
                self.power_on[i] = Some(PowerOn { regs, sregs });
                self.configure(&fd, index)?;
                Ok(fd)
            }
        }
    }

    fn configure(&mut self, fd: &VcpuFd, index: u32) -> Result<()> {
        let c = cpuid::for_vcpu(&self.cpuid, &self.topology, index);
        fd.set_cpuid2(&c).map_err(ioctl("KVM_SET_CPUID2"))?;
        self.cpuids[index as usize] = Some(c);
        // The VM's TSC rate, not this host's: a CPU hot-added after a migration must count at
        // the rate of its siblings' TSCs. Set only when it differs (KVM refuses any change
        // on a host without TSC scaling).
        if let Some(khz) = self.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                fd.set_tsc_khz(khz).map_err(ioctl("KVM_SET_TSC_KHZ"))?;
            }
        }
        let mut lapic = LapicPage::from(fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?);
        // LINT0 = ExtINT (the 8259), LINT1 = NMI: the wiring firmware leaves for the OS.
        lapic.set_lint_boot_defaults();
        fd.set_lapic(lapic.as_kvm()).map_err(ioctl("KVM_SET_LAPIC"))?;
        set_mtrr_default(fd)
    }

    /// Make a parked vCPU look freshly plugged: an AP at power-on, waiting for INIT/SIPI.
    fn reset_to_power_on(&self, fd: &VcpuFd, index: u32) -> Result<()> {
        let p = self.power_on[index as usize].ok_or(Error::NoSuchCpu(index))?;
        // Power-on SREGS first: it resets the APIC base to enabled xAPIC (the removed CPU may
        // have left it in x2APIC mode; INIT alone keeps the mode).
        fd.set_sregs(&p.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        fd.set_regs(&p.regs).map_err(ioctl("KVM_SET_REGS"))?;
        fd.set_fpu(&kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        })
        .map_err(ioctl("KVM_SET_FPU"))?;
        // The power-on LAPIC page (SW-disabled, LVTs masked), then the boot LINT wiring.
        let apic_id = self.topology.apic_id(index);
        let mut page = LapicPage::power_on(apic_id, false, &self.conv);
        page.set_lint_boot_defaults();
        fd.set_lapic(page.as_kvm()).map_err(ioctl("KVM_SET_LAPIC"))?;
        // The firmware MTRR setup, whatever the removed CPU's guest left there.
        set_mtrr_default(fd)?;
        // No stale exception, interrupt, NMI or latched INIT from its previous life.
        fd.set_vcpu_events(&kvm_vcpu_events::default())
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        // An AP that was never started: it blocks in KVM_RUN until INIT/SIPI.
        fd.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_UNINITIALIZED,
        })
        .map_err(ioctl("KVM_SET_MP_STATE"))
    }

    /// Start a thread for CPU `index` running `fd` (from [`VcpuManager::prepare`]).
    pub fn start(&mut self, index: u32, fd: VcpuFd) -> Result<()> {
        let r = VcpuRunner::spawn(index, fd, self.handler.clone())?;
        self.slots[index as usize] = Slot::Running(r);
        Ok(())
    }

    /// Start CPU `index` paused (for restore: requests are served, `KVM_RUN` waits).
    pub fn start_paused(&mut self, index: u32, fd: VcpuFd) -> Result<()> {
        let r = VcpuRunner::spawn_paused(index, fd, self.handler.clone())?;
        self.slots[index as usize] = Slot::Running(r);
        Ok(())
    }

    /// Hot-add CPU `index`: prepare (create or reuse) and start. The VMM then tells the guest.
    pub fn hot_add(&mut self, vm: &VmFd, index: u32) -> Result<()> {
        let fd = self.prepare(vm, index)?;
        self.start(index, fd)
    }

    /// Hot-remove CPU `index` after the guest ejected it: stop and join its thread, park the fd.
    pub fn hot_remove(&mut self, index: u32) -> Result<()> {
        let i = index as usize;
        let slot = self.slots.get_mut(i).ok_or(Error::NoSuchCpu(index))?;
        match std::mem::replace(slot, Slot::Absent) {
            Slot::Running(r) => match r.stop_and_join() {
                Some(fd) => {
                    self.slots[i] = Slot::Parked(fd);
                    Ok(())
                }
                None => Err(Error::ThreadPanicked(index)),
            },
            other => {
                self.slots[i] = other;
                Err(Error::NotRunning(index))
            }
        }
    }

    /// Pause every running vCPU: when this returns Ok, none is inside `KVM_RUN` and their
    /// pending PIO/MMIO is complete. No lock the exit path needs is held while waiting.
    pub fn pause_all(&self) -> Result<()> {
        let running: Vec<&VcpuRunner> = self
            .slots
            .iter()
            .filter_map(|s| if let Slot::Running(r) = s { Some(r) } else { None })
            .collect();
        for r in &running {
            r.request_pause();
        }
        for r in &running {
            if !r.wait_paused(VCPU_TIMEOUT) {
                return Err(Error::PauseTimeout(r.index()));
            }
        }
        Ok(())
    }

    /// Resume every paused vCPU. Each gets `KVM_KVMCLOCK_CTRL` first, which tells a guest
    /// using kvmclock that the vCPU was stopped by the host, so its soft-lockup watchdog does
    /// not fire after a long pause, snapshot or migration (KVM answers EINVAL when the guest
    /// has no kvmclock; that is fine).
    pub fn resume_all(&self) {
        for s in &self.slots {
            if let Slot::Running(r) = s {
                if r.is_paused() {
                    let _ = r.with_vcpu(VCPU_TIMEOUT, |fd| fd.kvmclock_ctrl().ok());
                }
                r.resume();
            }
        }
    }

    /// Save options for this VM: its LAPIC conventions and XSAVE size, with `msrs`. Set
    /// [`SaveOptions::nested_state`] on the result for guests that run their own VMs.
    pub fn save_options(&self, msrs: Vec<u32>) -> SaveOptions {
        SaveOptions::new(self.conv)
            .with_msrs(msrs)
            .with_xsave_size(self.xsave_size)
    }

    /// Restore options for this VM: its LAPIC conventions and XSAVE size, with `tsc`.
    pub fn restore_options(&self, tsc: TscPolicy) -> RestoreOptions {
        RestoreOptions::new(self.conv)
            .with_xsave_size(self.xsave_size)
            .with_tsc(tsc)
    }

    /// Save running vCPU `index` (paused) on its own thread, with the CPUID it was given.
    pub fn save(&self, index: u32, opts: &SaveOptions) -> Result<VcpuState> {
        let r = self.runner(index).ok_or(Error::NotRunning(index))?;
        let (id, opts) = (self.topology.apic_id(index), opts.clone());
        let cpuid = self.cpuid(index).cloned().ok_or(Error::NotRunning(index))?;
        r.with_vcpu(VCPU_TIMEOUT, move |fd| save_vcpu(fd, id, &cpuid, &opts))
            .ok_or(Error::Unresponsive(index))?
    }

    /// Save every running vCPU (pause first). Runs each save on its own vCPU thread.
    pub fn save_all(&self, opts: &SaveOptions) -> Result<Vec<(u32, VcpuState)>> {
        self.running()
            .into_iter()
            .map(|index| Ok((index, self.save(index, opts)?)))
            .collect()
    }

    /// Stop every vCPU thread (VM teardown).
    pub fn stop_all(&mut self) {
        for s in self.slots.iter_mut() {
            if let Slot::Running(r) = std::mem::replace(s, Slot::Absent) {
                if let Some(fd) = r.stop_and_join() {
                    *s = Slot::Parked(fd);
                }
            }
        }
    }
}
