// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Local APIC state as KVM sees it.
//!
//! The KVM LAPIC blob (`kvm_lapic_state`, `KVM_GET_LAPIC`/`KVM_SET_LAPIC`) is the first 1 KiB of
//! the virtual APIC page: 32-bit registers on a 16-byte stride. The APIC *mode* is not in the
//! blob: it comes from the IA32_APIC_BASE MSR, which is why this crate pairs the page with an
//! [`ApicBase`] and never treats the bare blob as the state.
//!
//! The crate's unit of state is (APIC base, page, conventions): [`LapicState`] holds the
//! canonical, convention-free form; [`KvmConventions`] says how a particular KVM lays out the
//! x2APIC ID and ICR; [`predict_set`] says what `KVM_SET_LAPIC` and the following
//! `KVM_GET_LAPIC` will do with a blob; the `kvm` feature adds detection and an atomic
//! restore through the ioctls. See the README for the divergences from the reference notes
//! that the real KVM showed.
//!
//! ```
//! use lapic_state::{regs, ApicBase, ApicMode, LapicPage, DeliveryMode};
//!
//! let mut page = LapicPage::default();
//! page.set_lint_boot_defaults();
//! assert_eq!(page.lvt(regs::LVT_LINT0).delivery_mode(), DeliveryMode::ExtInt);
//! assert_eq!(page.lvt(regs::LVT_LINT1).delivery_mode(), DeliveryMode::Nmi);
//! assert_eq!(ApicBase(0xfee0_0900).mode(), ApicMode::XApic);
//!
//! // A blob KVM reported in legacy x2APIC format, moved to a VM with 32-bit ids.
//! use lapic_state::{KvmConventions, LapicState};
//! let legacy = KvmConventions { x2apic_32bit_ids: false, ..KvmConventions::CANONICAL };
//! let mut blob = LapicPage::default();
//! blob.set_reg(regs::ID, 300u32 << 24); // KVM's legacy x2APIC id: truncated vcpu_id << 24
//! let s = LapicState::normalise(&blob, 300, ApicBase(0xfee0_0c00), &legacy).unwrap();
//! let out = s.denormalise(&KvmConventions::CANONICAL);
//! assert_eq!(out.reg(regs::ID), 300);
//! ```

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod base;
mod compat;
mod conventions;
mod page;
pub mod predict;
mod state;
pub mod timer;

#[cfg(feature = "kvm")]
pub mod kvm;

pub use base::{ApicBase, ApicMode};
pub use compat::{check_compatible, Incompatible, Loss, SavedLapic};
pub use conventions::{IcrLayout, KvmConventions};
pub use page::{
    regs, BadOffset, CanonicalPage, DeliveryMode, LapicPage, Lvt, Reg, TimerMode, VectorSet, ICR_HIGH_MERGED,
    PAGE_LEN,
};
pub use predict::{predict_set, PredictedFailure, Prediction, PriorApic, TmcctRead};
pub use state::{x2apic_ldr, DecodeError, Finding, LapicError, LapicState, ENCODED_LEN, FORMAT_VERSION};

// The README's examples are compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
