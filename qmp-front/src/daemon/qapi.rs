//! The QAPI types of the daemon's commands, declared once: argument types
//! (strictly parsed, with QEMU's error texts) and return types (serialised
//! and introspected). Pure declarations; no state, any thread.
//!
//! `BlockdevOptions` and `BlockdevCreateOptions` are flat unions on
//! `driver`; each driver contributes one variant struct in
//! [`BLOCKDEV_VARIANTS`] / [`CREATE_VARIANTS`]. Adding a driver to the
//! daemon is adding its option struct there; the options then reach the
//! driver's open (or create) function as a `block_core::Options` tree.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::qmp::schema::{Builtin, DescFn, Member, SchemaType, Size, TypeDesc, Union};
use crate::{qmp_enum, qmp_struct};

impl<T: SchemaType> SchemaType for Box<T> {
    const OPTIONAL: bool = T::OPTIONAL;
    fn describe() -> TypeDesc {
        T::describe()
    }
    fn is_absent(&self) -> bool {
        (**self).is_absent()
    }
}

/// A flat union's value kept as checked JSON; the description comes from
/// `D`. Used where the daemon hands the options on as a tree (blockdev-add,
/// blockdev-create) instead of a Rust struct per driver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Checked<D> {
    /// The checked and normalised members.
    pub map: Map<String, Value>,
    #[serde(skip)]
    _d: std::marker::PhantomData<D>,
}

impl<D: Describe> SchemaType for Checked<D> {
    fn describe() -> TypeDesc {
        D::describe()
    }
}

/// A type-level description provider for [`Checked`].
pub trait Describe {
    /// The description.
    fn describe() -> TypeDesc;
}

fn m(name: &'static str, ty: DescFn, optional: bool) -> Member {
    Member { name, ty, optional }
}

/// Driver names the daemon has option structs for (`BlockdevDriver`).
pub const DRIVERS: &[&str] = &["file", "null-co", "qcow2", "raw"];

fn blockdev_driver() -> TypeDesc {
    TypeDesc::Enum {
        name: "BlockdevDriver",
        values: DRIVERS,
    }
}

qmp_enum! {
    /// `BlockdevDiscardOptions`.
    pub enum DiscardOpt("BlockdevDiscardOptions") {
        /// ignore
        Ignore = "ignore",
        /// unmap
        Unmap = "unmap",
    }
}

qmp_enum! {
    /// `BlockdevDetectZeroesOptions`.
    pub enum DetectZeroesOpt("BlockdevDetectZeroesOptions") {
        /// off
        Off = "off",
        /// on
        On = "on",
        /// unmap
        Unmap = "unmap",
    }
}

qmp_enum! {
    /// `OnOffAuto`.
    pub enum OnOffAuto("OnOffAuto") {
        /// auto
        Auto = "auto",
        /// on
        On = "on",
        /// off
        Off = "off",
    }
}

qmp_enum! {
    /// `BlockdevAioOptions`.
    pub enum AioOpt("BlockdevAioOptions") {
        /// threads
        Threads = "threads",
        /// native
        Native = "native",
        /// io_uring
        IoUring = "io_uring",
    }
}

qmp_struct! {
    /// `BlockdevCacheOptions`.
    pub struct CacheOpts("BlockdevCacheOptions") {
        /// cache.direct
        "direct" => pub direct: Option<bool>,
        /// cache.no-flush
        "no-flush" => pub no_flush: Option<bool>,
    }
}

fn base_members() -> Vec<Member> {
    vec![
        m("driver", blockdev_driver, false),
        m("node-name", String::describe, true),
        m("discard", DiscardOpt::describe, true),
        m("cache", CacheOpts::describe, true),
        m("active", bool::describe, true),
        m("read-only", bool::describe, true),
        m("auto-read-only", bool::describe, true),
        m("force-share", bool::describe, true),
        m("detect-zeroes", DetectZeroesOpt::describe, true),
    ]
}

/// `BlockdevRef`: inline options or a node name.
fn blockdev_ref() -> TypeDesc {
    TypeDesc::Alternate {
        name: "BlockdevRef",
        members: vec![blockdev_options as DescFn, String::describe],
    }
}

fn null_type() -> TypeDesc {
    TypeDesc::Builtin(Builtin::Null)
}

/// `BlockdevRefOrNull`.
fn blockdev_ref_or_null() -> TypeDesc {
    TypeDesc::Alternate {
        name: "BlockdevRefOrNull",
        members: vec![blockdev_options as DescFn, String::describe, null_type],
    }
}

fn obj(name: &'static str, members: Vec<Member>) -> TypeDesc {
    TypeDesc::Object {
        name,
        members,
        union: None,
    }
}

fn opts_file() -> TypeDesc {
    obj(
        "BlockdevOptionsFile",
        vec![
            m("filename", String::describe, false),
            m("pr-manager", String::describe, true),
            m("locking", OnOffAuto::describe, true),
            m("aio", AioOpt::describe, true),
            m("aio-max-batch", i64::describe, true),
            m("drop-cache", bool::describe, true),
            m("x-check-cache-dropped", bool::describe, true),
        ],
    )
}

fn opts_raw() -> TypeDesc {
    obj(
        "BlockdevOptionsRaw",
        vec![
            m("file", blockdev_ref, false),
            m("offset", i64::describe, true),
            m("size", i64::describe, true),
        ],
    )
}

fn opts_null() -> TypeDesc {
    obj(
        "BlockdevOptionsNull",
        vec![
            m("size", i64::describe, true),
            m("latency-ns", u64::describe, true),
            m("read-zeroes", bool::describe, true),
        ],
    )
}

qmp_enum! {
    /// `Qcow2OverlapCheckMode`.
    pub enum OverlapMode("Qcow2OverlapCheckMode") {
        /// none
        None = "none",
        /// constant
        Constant = "constant",
        /// cached
        Cached = "cached",
        /// all
        All = "all",
    }
}

qmp_struct! {
    /// `Qcow2OverlapCheckFlags`.
    pub struct OverlapFlags("Qcow2OverlapCheckFlags") {
        /// template
        "template" => pub template: Option<OverlapMode>,
        /// main-header
        "main-header" => pub main_header: Option<bool>,
        /// active-l1
        "active-l1" => pub active_l1: Option<bool>,
        /// active-l2
        "active-l2" => pub active_l2: Option<bool>,
        /// refcount-table
        "refcount-table" => pub refcount_table: Option<bool>,
        /// refcount-block
        "refcount-block" => pub refcount_block: Option<bool>,
        /// snapshot-table
        "snapshot-table" => pub snapshot_table: Option<bool>,
        /// inactive-l1
        "inactive-l1" => pub inactive_l1: Option<bool>,
        /// inactive-l2
        "inactive-l2" => pub inactive_l2: Option<bool>,
        /// bitmap-directory
        "bitmap-directory" => pub bitmap_directory: Option<bool>,
    }
}

fn overlap_checks() -> TypeDesc {
    TypeDesc::Alternate {
        name: "Qcow2OverlapChecks",
        members: vec![OverlapFlags::describe as DescFn, OverlapMode::describe],
    }
}

qmp_enum! {
    /// `BlockdevQcow2EncryptionFormat`.
    pub enum Qcow2EncFormat("BlockdevQcow2EncryptionFormat") {
        /// aes
        Aes = "aes",
        /// luks
        Luks = "luks",
    }
}

fn qcow2_encryption() -> TypeDesc {
    fn secret() -> TypeDesc {
        obj(
            "QCryptoBlockOptionsQCow",
            vec![m("key-secret", String::describe, true)],
        )
    }
    TypeDesc::Object {
        name: "BlockdevQcow2Encryption",
        members: vec![m("format", Qcow2EncFormat::describe, false)],
        union: Some(Union {
            tag: "format",
            variants: vec![("aes", secret as DescFn), ("luks", secret as DescFn)],
        }),
    }
}

fn opts_qcow2() -> TypeDesc {
    obj(
        "BlockdevOptionsQcow2",
        vec![
            m("file", blockdev_ref, false),
            m("backing", blockdev_ref_or_null, true),
            m("lazy-refcounts", bool::describe, true),
            m("pass-discard-request", bool::describe, true),
            m("pass-discard-snapshot", bool::describe, true),
            m("pass-discard-other", bool::describe, true),
            m("discard-no-unref", bool::describe, true),
            m("overlap-check", overlap_checks, true),
            m("cache-size", i64::describe, true),
            m("l2-cache-size", i64::describe, true),
            m("l2-cache-entry-size", i64::describe, true),
            m("refcount-cache-size", i64::describe, true),
            m("cache-clean-interval", i64::describe, true),
            m("encrypt", qcow2_encryption, true),
            m("data-file", blockdev_ref, true),
        ],
    )
}

/// Each driver's `blockdev-add` option struct. Adding a driver = one line.
pub const BLOCKDEV_VARIANTS: &[(&str, DescFn)] = &[
    ("file", opts_file),
    ("null-co", opts_null),
    ("qcow2", opts_qcow2),
    ("raw", opts_raw),
];

/// `BlockdevOptions`.
pub fn blockdev_options() -> TypeDesc {
    TypeDesc::Object {
        name: "BlockdevOptions",
        members: base_members(),
        union: Some(Union {
            tag: "driver",
            variants: BLOCKDEV_VARIANTS.to_vec(),
        }),
    }
}

/// Marker for `BlockdevOptions`.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockdevOptionsD;
impl Describe for BlockdevOptionsD {
    fn describe() -> TypeDesc {
        blockdev_options()
    }
}

/// `blockdev-add`'s argument (the options themselves).
pub type BlockdevOptions = Checked<BlockdevOptionsD>;

qmp_enum! {
    /// `PreallocMode`.
    pub enum PreallocMode("PreallocMode") {
        /// off
        Off = "off",
        /// metadata
        Metadata = "metadata",
        /// falloc
        Falloc = "falloc",
        /// full
        Full = "full",
    }
}

qmp_enum! {
    /// `BlockdevQcow2Version`.
    pub enum Qcow2Version("BlockdevQcow2Version") {
        /// v2
        V2 = "v2",
        /// v3
        V3 = "v3",
    }
}

qmp_enum! {
    /// `Qcow2CompressionType`.
    pub enum Qcow2Compression("Qcow2CompressionType") {
        /// zlib
        Zlib = "zlib",
        /// zstd
        Zstd = "zstd",
    }
}

fn create_file() -> TypeDesc {
    obj(
        "BlockdevCreateOptionsFile",
        vec![
            m("filename", String::describe, false),
            m("size", Size::describe, false),
            m("preallocation", PreallocMode::describe, true),
            m("nocow", bool::describe, true),
            m("extent-size-hint", Size::describe, true),
        ],
    )
}

fn create_qcow2() -> TypeDesc {
    obj(
        "BlockdevCreateOptionsQcow2",
        vec![
            m("file", blockdev_ref, false),
            m("data-file", blockdev_ref, true),
            m("data-file-raw", bool::describe, true),
            m("extended-l2", bool::describe, true),
            m("size", Size::describe, false),
            m("version", Qcow2Version::describe, true),
            m("backing-file", String::describe, true),
            m("backing-fmt", blockdev_driver, true),
            m("encrypt", Value::describe, true),
            m("cluster-size", Size::describe, true),
            m("preallocation", PreallocMode::describe, true),
            m("lazy-refcounts", bool::describe, true),
            m("refcount-bits", i64::describe, true),
            m("compression-type", Qcow2Compression::describe, true),
        ],
    )
}

/// Each driver's `blockdev-create` option struct.
pub const CREATE_VARIANTS: &[(&str, DescFn)] = &[("file", create_file), ("qcow2", create_qcow2)];

/// Marker for `BlockdevCreateOptions`.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateOptionsD;
impl Describe for CreateOptionsD {
    fn describe() -> TypeDesc {
        TypeDesc::Object {
            name: "BlockdevCreateOptions",
            members: vec![m("driver", blockdev_driver, false)],
            union: Some(Union {
                tag: "driver",
                variants: CREATE_VARIANTS.to_vec(),
            }),
        }
    }
}

qmp_struct! {
    /// Arguments of `blockdev-create`.
    pub struct BlockdevCreateArgs("q_obj_blockdev-create-arg") {
        /// Job id.
        "job-id" => pub job_id: String,
        /// Creation options.
        "options" => pub options: Checked<CreateOptionsD>,
    }
}

qmp_struct! {
    /// Arguments of `blockdev-reopen`.
    pub struct BlockdevReopenArgs("q_obj_blockdev-reopen-arg") {
        /// New options of each node.
        "options" => pub options: Vec<BlockdevOptions>,
    }
}

qmp_struct! {
    /// Arguments of `blockdev-del`.
    pub struct NodeNameArg("q_obj_blockdev-del-arg") {
        /// Node.
        "node-name" => pub node_name: String,
    }
}

qmp_struct! {
    /// Arguments of `query-named-block-nodes`.
    pub struct QueryNodesArgs("q_obj_query-named-block-nodes-arg") {
        /// Flat list (no nested backing images).
        "flat" => pub flat: Option<bool>,
    }
}

qmp_struct! {
    /// Arguments of `query-blockstats`.
    pub struct QueryBlockstatsArgs("q_obj_query-blockstats-arg") {
        /// Per node instead of per device.
        "query-nodes" => pub query_nodes: Option<bool>,
    }
}

qmp_struct! {
    /// Arguments of `block_resize`.
    pub struct BlockResizeArgs("q_obj_block_resize-arg") {
        /// Device (BlockBackend) name.
        "device" => pub device: Option<String>,
        /// Node name.
        "node-name" => pub node_name: Option<String>,
        /// New size.
        "size" => pub size: i64,
    }
}

qmp_struct! {
    /// Arguments of `block-set-write-threshold`.
    pub struct WriteThresholdArgs("q_obj_block-set-write-threshold-arg") {
        /// Node.
        "node-name" => pub node_name: String,
        /// Threshold in bytes (0 disables).
        "write-threshold" => pub write_threshold: u64,
    }
}

qmp_struct! {
    /// Arguments of `job-*` commands.
    pub struct JobIdArg("q_obj_job-dismiss-arg") {
        /// Job id.
        "id" => pub id: String,
    }
}

qmp_struct! {
    /// Arguments of `block-job-cancel`.
    pub struct BlockJobCancelArgs("q_obj_block-job-cancel-arg") {
        /// Job id.
        "device" => pub device: String,
        /// Force.
        "force" => pub force: Option<bool>,
    }
}

qmp_struct! {
    /// Arguments of `block-job-dismiss` / `block-job-finalize`.
    pub struct BlockJobIdArg("q_obj_block-job-dismiss-arg") {
        /// Job id.
        "id" => pub id: String,
    }
}

qmp_struct! {
    /// `BlockdevCacheInfo`.
    pub struct CacheInfo("BlockdevCacheInfo") {
        /// writeback
        "writeback" => pub writeback: bool,
        /// direct
        "direct" => pub direct: bool,
        /// no-flush
        "no-flush" => pub no_flush: bool,
    }
}

qmp_struct! {
    /// `ImageInfoSpecific` (kept as type + data).
    pub struct ImageInfoSpecific("ImageInfoSpecific") {
        /// Format.
        "type" => pub ty: String,
        /// Format-specific data.
        "data" => pub data: Value,
    }
}

qmp_struct! {
    /// `SnapshotInfo`: one internal snapshot of an image.
    pub struct SnapshotInfoQ("SnapshotInfo") {
        /// Snapshot id.
        "id" => pub id: String,
        /// Snapshot name.
        "name" => pub name: String,
        /// Size of the saved VM state.
        "vm-state-size" => pub vm_state_size: i64,
        /// Creation time, seconds.
        "date-sec" => pub date_sec: i64,
        /// Creation time, nanoseconds part.
        "date-nsec" => pub date_nsec: i64,
        /// Guest clock, seconds.
        "vm-clock-sec" => pub vm_clock_sec: i64,
        /// Guest clock, nanoseconds part.
        "vm-clock-nsec" => pub vm_clock_nsec: i64,
        /// Guest instruction count, when recorded.
        "icount" => pub icount: Option<i64>,
    }
}

qmp_struct! {
    /// `ImageInfo`.
    pub struct ImageInfo("ImageInfo") {
        /// File name.
        "filename" => pub filename: String,
        /// Format.
        "format" => pub format: String,
        /// Dirty flag.
        "dirty-flag" => pub dirty_flag: Option<bool>,
        /// Bytes used on the host.
        "actual-size" => pub actual_size: Option<i64>,
        /// Guest-visible size.
        "virtual-size" => pub virtual_size: i64,
        /// Cluster size.
        "cluster-size" => pub cluster_size: Option<i64>,
        /// Encrypted.
        "encrypted" => pub encrypted: Option<bool>,
        /// Compressed.
        "compressed" => pub compressed: Option<bool>,
        /// Backing file name.
        "backing-filename" => pub backing_filename: Option<String>,
        /// Full backing file name.
        "full-backing-filename" => pub full_backing_filename: Option<String>,
        /// Backing format.
        "backing-filename-format" => pub backing_filename_format: Option<String>,
        /// Internal snapshots (absent when there are none).
        "snapshots" => pub snapshots: Option<Vec<SnapshotInfoQ>>,
        /// Format-specific information.
        "format-specific" => pub format_specific: Option<ImageInfoSpecific>,
        /// The backing image (nested mode).
        "backing-image" => pub backing_image: Option<Box<ImageInfo>>,
    }
}

qmp_struct! {
    /// `BlockDirtyInfo`.
    pub struct DirtyInfo("BlockDirtyInfo") {
        /// Name.
        "name" => pub name: Option<String>,
        /// Dirty bytes.
        "count" => pub count: i64,
        /// Granularity.
        "granularity" => pub granularity: u32,
        /// Recording.
        "recording" => pub recording: bool,
        /// Busy.
        "busy" => pub busy: bool,
        /// Persistent.
        "persistent" => pub persistent: bool,
        /// Not saved cleanly: unusable (absent when false).
        "inconsistent" => pub inconsistent: Option<bool>,
    }
}

qmp_struct! {
    /// `BlockDeviceInfo`.
    pub struct BlockDeviceInfo("BlockDeviceInfo") {
        /// File name.
        "file" => pub file: String,
        /// Node name.
        "node-name" => pub node_name: Option<String>,
        /// Read-only.
        "ro" => pub ro: bool,
        /// Driver.
        "drv" => pub drv: String,
        /// Backing file.
        "backing_file" => pub backing_file: Option<String>,
        /// Backing chain depth.
        "backing_file_depth" => pub backing_file_depth: i64,
        /// Active.
        "active" => pub active: bool,
        /// Encrypted.
        "encrypted" => pub encrypted: bool,
        /// detect-zeroes.
        "detect_zeroes" => pub detect_zeroes: DetectZeroesOpt,
        /// Throttling: bytes/s.
        "bps" => pub bps: i64,
        /// Throttling: read bytes/s.
        "bps_rd" => pub bps_rd: i64,
        /// Throttling: write bytes/s.
        "bps_wr" => pub bps_wr: i64,
        /// Throttling: ops/s.
        "iops" => pub iops: i64,
        /// Throttling: read ops/s.
        "iops_rd" => pub iops_rd: i64,
        /// Throttling: write ops/s.
        "iops_wr" => pub iops_wr: i64,
        /// Image information.
        "image" => pub image: ImageInfo,
        /// Cache mode.
        "cache" => pub cache: CacheInfo,
        /// Write threshold.
        "write_threshold" => pub write_threshold: i64,
        /// Dirty bitmaps.
        "dirty-bitmaps" => pub dirty_bitmaps: Option<Vec<DirtyInfo>>,
    }
}

qmp_struct! {
    /// `BlockDeviceTimedStats`.
    pub struct TimedStats("BlockDeviceTimedStats") {
        /// Interval.
        "interval_length" => pub interval_length: i64,
    }
}

qmp_struct! {
    /// `BlockDeviceStats`.
    pub struct DeviceStats("BlockDeviceStats") {
        /// rd_bytes
        "rd_bytes" => pub rd_bytes: i64,
        /// wr_bytes
        "wr_bytes" => pub wr_bytes: i64,
        /// zone_append_bytes
        "zone_append_bytes" => pub zone_append_bytes: i64,
        /// unmap_bytes
        "unmap_bytes" => pub unmap_bytes: i64,
        /// rd_operations
        "rd_operations" => pub rd_operations: i64,
        /// wr_operations
        "wr_operations" => pub wr_operations: i64,
        /// zone_append_operations
        "zone_append_operations" => pub zone_append_operations: i64,
        /// flush_operations
        "flush_operations" => pub flush_operations: i64,
        /// unmap_operations
        "unmap_operations" => pub unmap_operations: i64,
        /// rd_total_time_ns
        "rd_total_time_ns" => pub rd_total_time_ns: i64,
        /// wr_total_time_ns
        "wr_total_time_ns" => pub wr_total_time_ns: i64,
        /// zone_append_total_time_ns
        "zone_append_total_time_ns" => pub zone_append_total_time_ns: i64,
        /// flush_total_time_ns
        "flush_total_time_ns" => pub flush_total_time_ns: i64,
        /// unmap_total_time_ns
        "unmap_total_time_ns" => pub unmap_total_time_ns: i64,
        /// wr_highest_offset
        "wr_highest_offset" => pub wr_highest_offset: i64,
        /// rd_merged
        "rd_merged" => pub rd_merged: i64,
        /// wr_merged
        "wr_merged" => pub wr_merged: i64,
        /// zone_append_merged
        "zone_append_merged" => pub zone_append_merged: i64,
        /// unmap_merged
        "unmap_merged" => pub unmap_merged: i64,
        /// idle_time_ns
        "idle_time_ns" => pub idle_time_ns: Option<i64>,
        /// failed_rd_operations
        "failed_rd_operations" => pub failed_rd_operations: i64,
        /// failed_wr_operations
        "failed_wr_operations" => pub failed_wr_operations: i64,
        /// failed_zone_append_operations
        "failed_zone_append_operations" => pub failed_zone_append_operations: i64,
        /// failed_flush_operations
        "failed_flush_operations" => pub failed_flush_operations: i64,
        /// failed_unmap_operations
        "failed_unmap_operations" => pub failed_unmap_operations: i64,
        /// invalid_rd_operations
        "invalid_rd_operations" => pub invalid_rd_operations: i64,
        /// invalid_wr_operations
        "invalid_wr_operations" => pub invalid_wr_operations: i64,
        /// invalid_zone_append_operations
        "invalid_zone_append_operations" => pub invalid_zone_append_operations: i64,
        /// invalid_flush_operations
        "invalid_flush_operations" => pub invalid_flush_operations: i64,
        /// invalid_unmap_operations
        "invalid_unmap_operations" => pub invalid_unmap_operations: i64,
        /// account_invalid
        "account_invalid" => pub account_invalid: bool,
        /// account_failed
        "account_failed" => pub account_failed: bool,
        /// timed_stats
        "timed_stats" => pub timed_stats: Vec<TimedStats>,
    }
}

qmp_struct! {
    /// `BlockStats`.
    pub struct BlockStats("BlockStats") {
        /// Device.
        "device" => pub device: Option<String>,
        /// qdev.
        "qdev" => pub qdev: Option<String>,
        /// Node name.
        "node-name" => pub node_name: Option<String>,
        /// Statistics.
        "stats" => pub stats: DeviceStats,
        /// Driver-specific statistics.
        "driver-specific" => pub driver_specific: Option<Value>,
        /// The storage child's statistics.
        "parent" => pub parent: Option<Box<BlockStats>>,
        /// The backing child's statistics.
        "backing" => pub backing: Option<Box<BlockStats>>,
    }
}

qmp_enum! {
    /// `XDbgBlockGraphNodeType`.
    pub enum GraphNodeType("XDbgBlockGraphNodeType") {
        /// A BlockBackend.
        BlockBackend = "block-backend",
        /// A job.
        BlockJob = "block-job",
        /// A node.
        BlockDriver = "block-driver",
    }
}

qmp_enum! {
    /// `BlockPermission`.
    pub enum BlockPermission("BlockPermission") {
        /// consistent-read
        ConsistentRead = "consistent-read",
        /// write
        Write = "write",
        /// write-unchanged
        WriteUnchanged = "write-unchanged",
        /// resize
        Resize = "resize",
    }
}

qmp_struct! {
    /// `XDbgBlockGraphNode`.
    pub struct GraphNode("XDbgBlockGraphNode") {
        /// Id.
        "id" => pub id: u64,
        /// Type.
        "type" => pub ty: GraphNodeType,
        /// Name.
        "name" => pub name: String,
    }
}

qmp_struct! {
    /// `XDbgBlockGraphEdge`.
    pub struct GraphEdge("XDbgBlockGraphEdge") {
        /// Parent id.
        "parent" => pub parent: u64,
        /// Child id.
        "child" => pub child: u64,
        /// Edge name.
        "name" => pub name: String,
        /// Permissions taken.
        "perm" => pub perm: Vec<BlockPermission>,
        /// Permissions shared.
        "shared-perm" => pub shared_perm: Vec<BlockPermission>,
    }
}

qmp_struct! {
    /// `XDbgBlockGraph`.
    pub struct BlockGraph("XDbgBlockGraph") {
        /// Nodes.
        "nodes" => pub nodes: Vec<GraphNode>,
        /// Edges.
        "edges" => pub edges: Vec<GraphEdge>,
    }
}

qmp_struct! {
    /// `BlockInfo` (element of `query-block`; the daemon has no devices).
    pub struct BlockInfo("BlockInfo") {
        /// Device.
        "device" => pub device: String,
        /// Type.
        "type" => pub ty: String,
        /// Removable.
        "removable" => pub removable: bool,
        /// Locked.
        "locked" => pub locked: bool,
    }
}

qmp_enum! {
    /// `JobType`.
    pub enum JobTypeQ("JobType") {
        /// commit
        Commit = "commit",
        /// stream
        Stream = "stream",
        /// mirror
        Mirror = "mirror",
        /// backup
        Backup = "backup",
        /// create
        Create = "create",
        /// amend
        Amend = "amend",
        /// snapshot-load
        SnapshotLoad = "snapshot-load",
        /// snapshot-save
        SnapshotSave = "snapshot-save",
        /// snapshot-delete
        SnapshotDelete = "snapshot-delete",
    }
}

qmp_enum! {
    /// `JobStatus`.
    pub enum JobStatusQ("JobStatus") {
        /// undefined
        Undefined = "undefined",
        /// created
        Created = "created",
        /// running
        Running = "running",
        /// paused
        Paused = "paused",
        /// ready
        Ready = "ready",
        /// standby
        Standby = "standby",
        /// waiting
        Waiting = "waiting",
        /// pending
        Pending = "pending",
        /// aborting
        Aborting = "aborting",
        /// concluded
        Concluded = "concluded",
        /// null
        Null = "null",
    }
}

qmp_struct! {
    /// `JobInfo`.
    pub struct JobInfoQ("JobInfo") {
        /// Id.
        "id" => pub id: String,
        /// Type.
        "type" => pub ty: JobTypeQ,
        /// Status.
        "status" => pub status: JobStatusQ,
        /// Progress.
        "current-progress" => pub current_progress: i64,
        /// Total.
        "total-progress" => pub total_progress: i64,
        /// Error.
        "error" => pub error: Option<String>,
    }
}

qmp_struct! {
    /// Data of `JOB_STATUS_CHANGE`.
    pub struct JobStatusChange("q_obj_JOB_STATUS_CHANGE-arg") {
        /// Job id.
        "id" => pub id: String,
        /// New status.
        "status" => pub status: JobStatusQ,
    }
}

qmp_struct! {
    /// Data of `BLOCK_WRITE_THRESHOLD`.
    pub struct WriteThresholdEvent("q_obj_BLOCK_WRITE_THRESHOLD-arg") {
        /// Node.
        "node-name" => pub node_name: String,
        /// Bytes beyond the threshold.
        "amount-exceeded" => pub amount_exceeded: u64,
        /// The threshold.
        "write-threshold" => pub write_threshold: u64,
    }
}

qmp_struct! {
    /// Data of `BLOCK_EXPORT_DELETED`.
    pub struct ExportDeletedEvent("q_obj_BLOCK_EXPORT_DELETED-arg") {
        /// Export id.
        "id" => pub id: String,
    }
}

qmp_struct! {
    /// `ObjectPropertyInfo`.
    pub struct PropertyInfo("ObjectPropertyInfo") {
        /// Name.
        "name" => pub name: String,
        /// Type.
        "type" => pub ty: String,
        /// Description.
        "description" => pub description: Option<String>,
        /// Default.
        "default-value" => pub default_value: Option<Value>,
    }
}

qmp_struct! {
    /// Arguments of `qom-list`.
    pub struct QomListArgs("q_obj_qom-list-arg") {
        /// Path.
        "path" => pub path: String,
    }
}

qmp_struct! {
    /// Arguments of `qom-get`.
    pub struct QomGetArgs("q_obj_qom-get-arg") {
        /// Path.
        "path" => pub path: String,
        /// Property.
        "property" => pub property: String,
    }
}

qmp_struct! {
    /// Arguments of `qom-set`.
    pub struct QomSetArgs("q_obj_qom-set-arg") {
        /// Path.
        "path" => pub path: String,
        /// Property.
        "property" => pub property: String,
        /// Value.
        "value" => pub value: Value,
    }
}

qmp_struct! {
    /// Arguments of `object-del`.
    pub struct ObjectDelArgs("q_obj_object-del-arg") {
        /// Object id.
        "id" => pub id: String,
    }
}

qmp_enum! {
    /// `ObjectType` (the types this daemon can create).
    pub enum ObjectType("ObjectType") {
        /// An I/O thread.
        Iothread = "iothread",
    }
}

qmp_struct! {
    /// `IothreadProperties`.
    pub struct IothreadProps("IothreadProperties") {
        /// aio-max-batch
        "aio-max-batch" => pub aio_max_batch: Option<i64>,
        /// thread-pool-min
        "thread-pool-min" => pub thread_pool_min: Option<i64>,
        /// thread-pool-max
        "thread-pool-max" => pub thread_pool_max: Option<i64>,
        /// poll-max-ns
        "poll-max-ns" => pub poll_max_ns: Option<i64>,
        /// poll-grow
        "poll-grow" => pub poll_grow: Option<i64>,
        /// poll-shrink
        "poll-shrink" => pub poll_shrink: Option<i64>,
    }
}

fn iothread_props() -> TypeDesc {
    IothreadProps::describe()
}

/// Marker for `ObjectOptions`.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectOptionsD;
impl Describe for ObjectOptionsD {
    fn describe() -> TypeDesc {
        TypeDesc::Object {
            name: "ObjectOptions",
            members: vec![
                m("qom-type", ObjectType::describe, false),
                m("id", String::describe, false),
            ],
            union: Some(Union {
                tag: "qom-type",
                variants: vec![("iothread", iothread_props as DescFn)],
            }),
        }
    }
}

/// `object-add`'s argument.
pub type ObjectOptions = Checked<ObjectOptionsD>;

qmp_struct! {
    /// `IOThreadInfo`.
    pub struct IothreadInfo("IOThreadInfo") {
        /// Id.
        "id" => pub id: String,
        /// Host thread id.
        "thread-id" => pub thread_id: i64,
        /// poll-max-ns
        "poll-max-ns" => pub poll_max_ns: i64,
        /// poll-grow
        "poll-grow" => pub poll_grow: i64,
        /// poll-shrink
        "poll-shrink" => pub poll_shrink: i64,
        /// aio-max-batch
        "aio-max-batch" => pub aio_max_batch: i64,
    }
}

qmp_struct! {
    /// `BlockExportInfo`.
    pub struct BlockExportInfo("BlockExportInfo") {
        /// Id.
        "id" => pub id: String,
        /// Type.
        "type" => pub ty: BlockExportType,
        /// Node.
        "node-name" => pub node_name: String,
        /// Shutting down.
        "shutting-down" => pub shutting_down: bool,
    }
}

/// Converts checked JSON into the engine's option tree.
pub fn to_options(map: &Map<String, Value>) -> block_core::Options {
    let mut o = block_core::Options::new();
    for (k, v) in map {
        o.insert(k, to_optvalue(v));
    }
    o
}

fn to_optvalue(v: &Value) -> block_core::OptValue {
    use block_core::OptValue;
    match v {
        Value::Null => OptValue::Null,
        Value::Bool(b) => OptValue::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => OptValue::Int(i),
            (None, Some(u)) => OptValue::UInt(u),
            _ => OptValue::Str(n.to_string()),
        },
        Value::String(s) => OptValue::Str(s.clone()),
        Value::Array(a) => OptValue::List(a.iter().map(to_optvalue).collect()),
        Value::Object(m) => OptValue::Map(to_options(m)),
    }
}

qmp_enum! {
    /// `SocketAddressType`.
    pub enum SocketAddressType("SocketAddressType") {
        /// inet
        Inet = "inet",
        /// unix
        Unix = "unix",
        /// vsock
        Vsock = "vsock",
        /// fd
        Fd = "fd",
    }
}

fn inet_addr() -> TypeDesc {
    obj(
        "InetSocketAddress",
        vec![
            m("host", String::describe, false),
            m("port", String::describe, false),
            m("numeric", bool::describe, true),
            m("to", u16::describe, true),
            m("ipv4", bool::describe, true),
            m("ipv6", bool::describe, true),
            m("keep-alive", bool::describe, true),
            m("mptcp", bool::describe, true),
        ],
    )
}

fn unix_addr() -> TypeDesc {
    obj(
        "UnixSocketAddress",
        vec![
            m("path", String::describe, false),
            m("abstract", bool::describe, true),
            m("tight", bool::describe, true),
        ],
    )
}

fn vsock_addr() -> TypeDesc {
    obj(
        "VsockSocketAddress",
        vec![
            m("cid", String::describe, false),
            m("port", String::describe, false),
        ],
    )
}

fn fd_addr() -> TypeDesc {
    obj("FdSocketAddress", vec![m("str", String::describe, false)])
}

/// `SocketAddress` (flat union on `type`).
pub fn socket_address() -> TypeDesc {
    TypeDesc::Object {
        name: "SocketAddress",
        members: vec![m("type", SocketAddressType::describe, false)],
        union: Some(Union {
            tag: "type",
            variants: vec![
                ("inet", inet_addr as DescFn),
                ("unix", unix_addr),
                ("vsock", vsock_addr),
                ("fd", fd_addr),
            ],
        }),
    }
}

/// Marker for `NbdServerOptions` (`--nbd-server`).
#[derive(Debug, Clone, PartialEq)]
pub struct NbdServerOptionsD;
impl Describe for NbdServerOptionsD {
    fn describe() -> TypeDesc {
        obj(
            "NbdServerOptions",
            vec![
                m("handshake-max-seconds", u32::describe, true),
                m("tls-creds", String::describe, true),
                m("tls-authz", String::describe, true),
                m("max-connections", u32::describe, true),
                m("addr", socket_address, false),
            ],
        )
    }
}

/// `--nbd-server`'s argument.
pub type NbdServerOptions = Checked<NbdServerOptionsD>;

qmp_enum! {
    /// `BlockExportType`. Every type QEMU knows parses, so that the ones
    /// this daemon cannot serve get a clear refusal instead of a schema
    /// error about their members.
    pub enum BlockExportType("BlockExportType") {
        /// NBD.
        Nbd = "nbd",
        /// vhost-user-blk (not served by stratad).
        VhostUserBlk = "vhost-user-blk",
        /// FUSE (not served by stratad).
        Fuse = "fuse",
        /// VDUSE (not served by stratad).
        VduseBlk = "vduse-blk",
    }
}

qmp_enum! {
    /// `BlockExportRemoveMode`.
    pub enum BlockExportRemoveMode("BlockExportRemoveMode") {
        /// Refuse while clients are connected.
        Safe = "safe",
        /// Disconnect clients.
        Hard = "hard",
    }
}

qmp_struct! {
    /// `BlockDirtyBitmap`, the object branch of `BlockDirtyBitmapOrStr`.
    pub struct ExportBitmap("BlockDirtyBitmap") {
        /// Node.
        "node" => pub node: String,
        /// Bitmap name.
        "name" => pub name: String,
    }
}

fn bitmap_or_str() -> TypeDesc {
    TypeDesc::Alternate {
        name: "BlockDirtyBitmapOrStr",
        members: vec![String::describe, ExportBitmap::describe],
    }
}

fn export_nbd() -> TypeDesc {
    obj(
        "BlockExportOptionsNbd",
        vec![
            m("name", String::describe, true),
            m("description", String::describe, true),
            m("bitmaps", || TypeDesc::Array(bitmap_or_str), true),
            m("allocation-depth", bool::describe, true),
        ],
    )
}

fn export_vhost_user_blk() -> TypeDesc {
    obj(
        "BlockExportOptionsVhostUserBlk",
        vec![
            m("addr", socket_address, false),
            m("logical-block-size", u64::describe, true),
            m("num-queues", u16::describe, true),
        ],
    )
}

qmp_enum! {
    /// `FuseExportAllowOther`.
    pub enum FuseAllowOther("FuseExportAllowOther") {
        /// off
        Off = "off",
        /// on
        On = "on",
        /// auto
        Auto = "auto",
    }
}

fn export_fuse() -> TypeDesc {
    obj(
        "BlockExportOptionsFuse",
        vec![
            m("mountpoint", String::describe, false),
            m("growable", bool::describe, true),
            m("allow-other", FuseAllowOther::describe, true),
        ],
    )
}

fn export_vduse_blk() -> TypeDesc {
    obj(
        "BlockExportOptionsVduseBlk",
        vec![
            m("name", String::describe, false),
            m("num-queues", u16::describe, true),
            m("queue-size", u16::describe, true),
            m("logical-block-size", u64::describe, true),
            m("serial", String::describe, true),
        ],
    )
}

fn wrapper(name: &'static str, data: DescFn) -> TypeDesc {
    TypeDesc::Object {
        name,
        members: vec![m("data", data, false)],
        union: None,
    }
}

/// `SocketAddressLegacy` (`nbd-server-start`'s `addr`): each variant's
/// members sit under `data`.
pub fn socket_address_legacy() -> TypeDesc {
    TypeDesc::Object {
        name: "SocketAddressLegacy",
        members: vec![m("type", SocketAddressType::describe, false)],
        union: Some(Union {
            tag: "type",
            variants: vec![
                ("inet", || wrapper("InetSocketAddressWrapper", inet_addr)),
                ("unix", || wrapper("UnixSocketAddressWrapper", unix_addr)),
                ("vsock", || wrapper("VsockSocketAddressWrapper", vsock_addr)),
                ("fd", || wrapper("FdSocketAddressWrapper", fd_addr)),
            ],
        }),
    }
}

/// Marker for `nbd-server-start`'s arguments (`NbdServerOptionsLegacy`).
#[derive(Debug, Clone, PartialEq)]
pub struct NbdServerStartD;
impl Describe for NbdServerStartD {
    fn describe() -> TypeDesc {
        obj(
            "NbdServerOptionsLegacy",
            vec![
                m("handshake-max-seconds", u32::describe, true),
                m("tls-creds", String::describe, true),
                m("tls-authz", String::describe, true),
                m("max-connections", u32::describe, true),
                m("addr", socket_address_legacy, false),
            ],
        )
    }
}

/// `nbd-server-start`'s arguments.
pub type NbdServerStartArgs = Checked<NbdServerStartD>;

qmp_struct! {
    /// Arguments of `nbd-server-add`.
    pub struct NbdServerAddArgs("NbdServerAddOptions") {
        /// Export name (defaults to the device).
        "name" => pub name: Option<String>,
        /// Free-form description.
        "description" => pub description: Option<String>,
        /// Node (or device) to export.
        "device" => pub device: String,
        /// Whether clients may write.
        "writable" => pub writable: Option<bool>,
        /// Dirty bitmap to export.
        "bitmap" => pub bitmap: Option<String>,
    }
}

qmp_struct! {
    /// Arguments of `nbd-server-remove`.
    pub struct NbdServerRemoveArgs("q_obj_nbd-server-remove-arg") {
        /// Export id (the name `nbd-server-add` was given).
        "name" => pub name: String,
        /// Removal mode.
        "mode" => pub mode: Option<BlockExportRemoveMode>,
    }
}

qmp_struct! {
    /// Arguments of `block-export-del`.
    pub struct BlockExportDelArgs("q_obj_block-export-del-arg") {
        /// Export id.
        "id" => pub id: String,
        /// Removal mode.
        "mode" => pub mode: Option<BlockExportRemoveMode>,
    }
}

/// Marker for `BlockExportOptions` (`--export`, `block-export-add`).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockExportOptionsD;
impl Describe for BlockExportOptionsD {
    fn describe() -> TypeDesc {
        TypeDesc::Object {
            name: "BlockExportOptions",
            members: vec![
                m("type", BlockExportType::describe, false),
                m("id", String::describe, false),
                m("fixed-iothread", bool::describe, true),
                m("iothread", String::describe, true),
                m("node-name", String::describe, false),
                m("writable", bool::describe, true),
                m("writethrough", bool::describe, true),
                m("allow-inactive", bool::describe, true),
            ],
            union: Some(Union {
                tag: "type",
                variants: vec![
                    ("nbd", export_nbd as DescFn),
                    ("vhost-user-blk", export_vhost_user_blk),
                    ("fuse", export_fuse),
                    ("vduse-blk", export_vduse_blk),
                ],
            }),
        }
    }
}

/// `--export`'s and `block-export-add`'s argument.
pub type BlockExportOptions = Checked<BlockExportOptionsD>;

qmp_struct! {
    /// Arguments of `block-job-set-speed`.
    pub struct BlockJobSpeedArgs("q_obj_block-job-set-speed-arg") {
        /// Job id.
        "device" => pub device: String,
        /// Bytes per second.
        "speed" => pub speed: i64,
    }
}

qmp_struct! {
    /// Arguments of `block-job-pause`, `-resume`, `-complete`.
    pub struct BlockJobDeviceArg("q_obj_block-job-pause-arg") {
        /// Job id.
        "device" => pub device: String,
    }
}

qmp_struct! {
    /// `BlockJobInfo` (element of `query-block-jobs`).
    pub struct BlockJobInfo("BlockJobInfo") {
        /// Type.
        "type" => pub ty: JobTypeQ,
        /// Job id.
        "device" => pub device: String,
        /// Progress.
        "len" => pub len: i64,
        /// Progress.
        "offset" => pub offset: i64,
        /// Busy.
        "busy" => pub busy: bool,
        /// Paused.
        "paused" => pub paused: bool,
        /// Speed.
        "speed" => pub speed: i64,
        /// I/O status.
        "io-status" => pub io_status: String,
        /// Ready.
        "ready" => pub ready: bool,
        /// Status.
        "status" => pub status: JobStatusQ,
        /// auto-finalize.
        "auto-finalize" => pub auto_finalize: bool,
        /// auto-dismiss.
        "auto-dismiss" => pub auto_dismiss: bool,
        /// Error.
        "error" => pub error: Option<String>,
    }
}

qmp_struct! {
    /// Arguments of `block-dirty-bitmap-add`.
    pub struct BitmapAddArgs("q_obj_block-dirty-bitmap-add-arg") {
        /// Node (or device) name.
        "node" => pub node: String,
        /// Bitmap name.
        "name" => pub name: String,
        /// Bytes per bit; QEMU's default from the cluster size when absent.
        "granularity" => pub granularity: Option<u32>,
        /// Stored in the image (qcow2 bitmap directory).
        "persistent" => pub persistent: Option<bool>,
        /// Created with recording off.
        "disabled" => pub disabled: Option<bool>,
    }
}

/// `BlockDirtyBitmapOrStr`: a bitmap name on the command's node, or a
/// node and name.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum BitmapOrStr {
    /// A bitmap of the command's node.
    Name(String),
    /// A bitmap of any node.
    Full(ExportBitmap),
}

impl SchemaType for BitmapOrStr {
    fn describe() -> TypeDesc {
        bitmap_or_str()
    }
}

qmp_struct! {
    /// Arguments of `block-dirty-bitmap-merge`.
    pub struct BitmapMergeArgs("BlockDirtyBitmapMerge") {
        /// Node of the target bitmap.
        "node" => pub node: String,
        /// Target bitmap name.
        "target" => pub target: String,
        /// Bitmaps to merge into the target.
        "bitmaps" => pub bitmaps: Vec<BitmapOrStr>,
    }
}
