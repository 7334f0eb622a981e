//! `VFIO_DEVICE_FEATURE` with `VFIO_DEVICE_FEATURE_PROBE`: does the device implement a feature,
//! asked without doing it. By hand: vfio-ioctls 0.10 issues the ioctl for migration and DMA
//! logging but never probes (its one probe, for DMA_BUF, is private), and asking whether a
//! device can log its DMA by starting the log would start it; vfio-bindings 0.7 has the struct
//! and flags, used here. Any device fd works (a group's device fd or a bound cdev).

use std::io;
use std::mem::size_of;
use std::os::fd::AsRawFd;

use vfio_bindings::bindings::vfio::{
    vfio_device_feature, VFIO_BASE, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_SET,
};

use super::io_nr;

/// `VFIO_DEVICE_FEATURE` (the same number as the container's VFIO_IOMMU_DIRTY_PAGES: one is a
/// device ioctl, the other a container's).
pub const VFIO_DEVICE_FEATURE: libc::c_ulong = io_nr(VFIO_BASE + 17);
const _: () = assert!(VFIO_DEVICE_FEATURE == 0x3b75);
const _: () = assert!(size_of::<vfio_device_feature>() == 8);

/// Which way a feature is used: the kernel answers a probe for the direction asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Get,
    Set,
}

#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error("VFIO_DEVICE_FEATURE(PROBE, {direction:?} feature {feature}): {source}")]
    Probe {
        feature: u32,
        direction: Direction,
        source: io::Error,
    },
    #[error("feature number {0} is over VFIO_DEVICE_FEATURE_MASK")]
    BadFeature(u32),
}

/// The probe itself: `Ok` when the device implements `feature` for `direction`, else the
/// kernel's errno (ENOTTY: no such feature on this device or kernel).
pub fn probe(
    device: &impl AsRawFd,
    feature: u32,
    direction: Direction,
) -> Result<(), FeatureError> {
    if feature & !VFIO_DEVICE_FEATURE_MASK != 0 {
        return Err(FeatureError::BadFeature(feature));
    }
    let arg = vfio_device_feature {
        argsz: size_of::<vfio_device_feature>() as u32,
        flags: VFIO_DEVICE_FEATURE_PROBE
            | feature
            | match direction {
                Direction::Get => VFIO_DEVICE_FEATURE_GET,
                Direction::Set => VFIO_DEVICE_FEATURE_SET,
            },
        ..Default::default()
    };
    // SAFETY: a probe carries no payload: the kernel reads the 8 bytes of `arg` (argsz says so),
    // which lives across the call, and writes nothing; the result is checked.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(device, VFIO_DEVICE_FEATURE, &arg) };
    if rc < 0 {
        return Err(FeatureError::Probe {
            feature,
            direction,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// [`probe`] as a yes or no: ENOTTY (the feature is unknown to the device's driver, or the
/// device has no such ops) and EINVAL (a driver with no feature ioctl at all, or one that
/// refuses this direction) are "no"; any other errno is an error.
pub fn supported(
    device: &impl AsRawFd,
    feature: u32,
    direction: Direction,
) -> Result<bool, FeatureError> {
    match probe(device, feature, direction) {
        Ok(()) => Ok(true),
        Err(FeatureError::Probe { ref source, .. })
            if matches!(source.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_bindings::bindings::vfio::VFIO_DEVICE_FEATURE_DMA_LOGGING_START;

    #[test]
    fn a_probe_of_a_file_that_is_no_device_says_enotty_and_names_the_ioctl() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let e = probe(&null, VFIO_DEVICE_FEATURE_DMA_LOGGING_START, Direction::Set).unwrap_err();
        assert_eq!(crate::vfio::errno_of(&e), Some(libc::ENOTTY), "{e}");
        assert!(
            e.to_string().starts_with("VFIO_DEVICE_FEATURE(PROBE"),
            "{e}"
        );
        assert!(!supported(&null, VFIO_DEVICE_FEATURE_DMA_LOGGING_START, Direction::Set).unwrap());
    }

    #[test]
    fn a_feature_over_the_mask_never_reaches_the_kernel() {
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(matches!(
            probe(&null, VFIO_DEVICE_FEATURE_SET, Direction::Get),
            Err(FeatureError::BadFeature(_))
        ));
    }
}
