//! VFIO devices: BAR mmaps and DMA dirty tracking (being written).

use crate::devices::DeviceFindings;
use crate::report::DeviceLine;
use crate::ProbeOpts;

pub fn probe(_opts: &ProbeOpts) -> DeviceFindings {
    DeviceFindings {
        kinds: Vec::new(),
        cells: Vec::new(),
        line: DeviceLine {
            device: "VFIO".into(),
            found: false,
            line: "not probed by this build".into(),
        },
    }
}
