//! Backend colours for the chart, fixed so that the same backend has the same colour in every
//! chart and two charts (say PVM and hardware) can be compared side by side.

use plotters::style::RGBColor;

/// Okabe–Ito colours (distinguishable with the common colour-vision deficiencies), then a few
/// extra for backends this module does not know. Yellow is left out: it vanishes on white.
const PALETTE: [RGBColor; 10] = [
    RGBColor(0x00, 0x72, 0xB2), // blue: KVM dirty bitmap
    RGBColor(0x56, 0xB4, 0xE9), // sky blue: bitmap with manual clear
    RGBColor(0x00, 0x9E, 0x73), // green: dirty ring
    RGBColor(0xD5, 0x5E, 0x00), // vermillion: userfaultfd write-protect
    RGBColor(0xE6, 0x9F, 0x00), // orange: userfaultfd WP_ASYNC + PAGEMAP_SCAN
    RGBColor(0xCC, 0x79, 0xA7), // reddish purple: soft-dirty
    RGBColor(0x33, 0x33, 0x33),
    RGBColor(0x88, 0x22, 0x55),
    RGBColor(0x44, 0xAA, 0x99),
    RGBColor(0x99, 0x99, 0x33),
];

/// Index of the first colour handed to backends that [`known_slot`] does not recognise.
const FIRST_SPARE: usize = 6;

/// Colours for `backends`, in the same order.
///
/// Known backends get their own fixed colour whatever else is in the report; unknown ones share
/// the spare colours in order of appearance, which is stable as long as the set of backends is.
pub(crate) fn colours(backends: &[String]) -> Vec<RGBColor> {
    let mut next_spare = FIRST_SPARE;
    backends
        .iter()
        .map(|name| {
            let slot = known_slot(name).unwrap_or_else(|| {
                let slot = next_spare;
                next_spare += 1;
                if next_spare == PALETTE.len() {
                    next_spare = FIRST_SPARE;
                }
                slot
            });
            PALETTE[slot]
        })
        .collect()
}

/// The fixed palette slot of a well-known backend, matched by keyword because the runner's
/// spelling ("bitmap-manual" today, perhaps "dirty-log-manual-clear" tomorrow) is its own to
/// choose. The order of the checks matters: "bitmap-manual" also contains "bitmap", and the
/// asynchronous userfaultfd backend also contains "uffd".
fn known_slot(name: &str) -> Option<usize> {
    let name = name.to_ascii_lowercase();
    let has = |keys: &[&str]| keys.iter().any(|k| name.contains(k));
    if has(&["soft"]) {
        Some(5)
    } else if has(&["async", "pagemap", "scan"]) {
        Some(4)
    } else if has(&["uffd", "userfault"]) {
        Some(3)
    } else if has(&["ring"]) {
        Some(2)
    } else if has(&["manual", "clear"]) {
        Some(1)
    } else if has(&["bitmap", "dirty-log", "dirty_log", "log"]) {
        Some(0)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_six_backends_get_distinct_colours() {
        // The runner's names (`TrackerKind::name`), and a longer spelling of the same six.
        for list in [
            [
                "bitmap",
                "bitmap-manual",
                "ring",
                "uffd-wp",
                "uffd-wp-async",
                "soft-dirty",
            ],
            [
                "dirty-log",
                "dirty-log-manual-clear",
                "dirty-ring",
                "userfaultfd-wp",
                "uffd-wp-async-pagemap-scan",
                "soft-dirty",
            ],
        ] {
            let backends = names(&list);
            let c = colours(&backends);
            assert!(backends.iter().all(|b| known_slot(b).is_some()));
            for i in 0..c.len() {
                for j in i + 1..c.len() {
                    assert_ne!(c[i], c[j], "{} and {}", backends[i], backends[j]);
                }
            }
        }
    }

    #[test]
    fn colour_does_not_depend_on_the_rest_of_the_report() {
        let alone = colours(&names(&["ring"]));
        let among = colours(&names(&["bitmap", "soft-dirty", "ring"]));
        assert_eq!(alone[0], among[2]);
    }

    #[test]
    fn unknown_backends_get_spare_colours() {
        let many: Vec<String> = (0..12).map(|i| format!("mystery{i}")).collect();
        let c = colours(&many);
        assert_eq!(c[0], PALETTE[FIRST_SPARE]);
        assert_eq!(c[1], PALETTE[FIRST_SPARE + 1]);
        // Wraps within the spares instead of running off the palette.
        assert!(c
            .iter()
            .all(|colour| PALETTE[FIRST_SPARE..].contains(colour)));
    }
}
