//! The guest's resources, each with one owner inside the VM (ARCHITECTURE.md): memory slots.

pub mod memslots;
