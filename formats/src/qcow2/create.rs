//! Image creation (QEMU's `qcow2_co_create`), laid out byte for byte as
//! `qemu-img create -f qcow2` lays it out.
