// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Local APIC state as KVM sees it.
//!
//! The KVM LAPIC blob (`kvm_lapic_state`, `KVM_GET_LAPIC`/`KVM_SET_LAPIC`) is the first 1 KiB of
//! the virtual APIC page: 32-bit registers on a 16-byte stride. The APIC *mode* is not in the
//! blob: it comes from the IA32_APIC_BASE MSR, which is why this crate pairs the page with an
//! [`ApicBase`] and never treats the bare blob as the state.
//!
//! This version provides the typed register view ([`LapicPage`]), the APIC base decoding
//! ([`ApicBase`], [`ApicMode`]) and the boot-time helpers a VMM needs
//! ([`LapicPage::set_lint_boot_defaults`]). No `/dev/kvm` is needed.
//!
//! ```
//! use lapic_state::{regs, ApicBase, ApicMode, LapicPage, DeliveryMode};
//!
//! let mut page = LapicPage::default();
//! page.set_lint_boot_defaults();
//! assert_eq!(page.lvt(regs::LVT_LINT0).delivery_mode(), DeliveryMode::ExtInt);
//! assert_eq!(page.lvt(regs::LVT_LINT1).delivery_mode(), DeliveryMode::Nmi);
//! assert_eq!(ApicBase(0xfee0_0900).mode(), ApicMode::XApic);
//! ```

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod base;
mod conventions;
mod page;
pub mod predict;
mod state;
pub mod timer;

#[cfg(feature = "kvm")]
pub mod kvm;

pub use base::{ApicBase, ApicMode};
pub use conventions::{IcrLayout, KvmConventions};
pub use page::{regs, DeliveryMode, LapicPage, Lvt, TimerMode, VectorSet};
pub use predict::{predict_set, PredictedFailure, Prediction, PriorApic, TmcctRead};
pub use state::{x2apic_ldr, DecodeError, Finding, LapicError, LapicState, ENCODED_LEN, FORMAT_VERSION};
