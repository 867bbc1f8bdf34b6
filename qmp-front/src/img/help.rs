//! The `--help` texts of the subcommands, as qemu-img 10 prints them (with
//! this tool's name).

use super::PROG;

/// The help text of subcommand `cmd`, empty for an unknown one.
pub fn text(cmd: &str) -> String {
    let t = match cmd {
        "create" => {
            r#"Usage:
Create and format new image file.  Usage:

  qemu-img create [-f FMT] [-o FMT_OPTS] [-b BACKING_FILENAME [-F BACKING_FMT]]
        [--object OBJDEF] [-u] FILENAME [SIZE[bkKMGTPE]]

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -f, --format FMT
     specifies format of the new image, default is raw
  -o, --options FMT_OPTS
     format-specific options ('-o list' for list)
  -b, --backing BACKING_FILENAME
     stack new image on top of BACKING_FILENAME
     (for formats which support stacking)
  -F, --backing-format BACKING_FMT
     specify format of BACKING_FILENAME
  -u, --backing-unsafe
     do not fail if BACKING_FMT can not be read
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file to create.  It will be overridden if exists
  SIZE
     image size with optional suffix (multiplies in 1024)
     SIZE is required unless BACKING_IMG is specified,
     in which case it will be the same as size of BACKING_IMG

"#
        }
        "info" => {
            r#"Usage:
Display information about image.  Usage:

  qemu-img info [-f FMT | --image-opts] [-b] [-U] [--object OBJDEF]
        [--output human|json] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME image format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -b, --backing-chain
     display information about backing chaing
  (in case the image is stacked
  -U, --force-share
     open image in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  --output human|json
     specify output format name (default human)
  FILENAME
     image file name (or specification with --image-opts)

"#
        }
        "check" => {
            r#"Usage:
Check basic image integrity.  Usage:

  qemu-img check [-f FMT | --image-opts] [-T CACHE_MODE] [-r] [-u]
        [--output human|json] [--object OBJDEF] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -f, --format FMT
     specifies format of the image explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  -T, --cache CACHE_MODE
     image cache mode (writeback)
  -U, --force-share
     open image in shared mode for concurrent access
  --output human|json
     output format
  -r, --repair leaks|all
     repair particular aspect of the image
     (image will be open in read-write mode, incompatible with --force-share)
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     the image file (or image specification) to operate on

"#
        }
        "map" => {
            r#"Usage:
Dump image metadata.  Usage:

  qemu-img map [-f FMT | --image-opts] [--object OBJDEF] [--output human|json]
        [--start-offset OFFSET] [--max-length LENGTH] [-U] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME image format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  --start-offset OFFSET
  --max-length LENGTH
  --output human|json
     specify output format name (default human)
  -U, --force-share
     open image in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file name (or specification with --image-opts)

"#
        }
        "compare" => {
            r#"Usage:
Check if two images have the same contents.  Usage:

  qemu-img compare [--image-opts | [-f FMT] [-F FMT]] [-s]
        [-T CACHE] [-U] [--object OBJDEF] FILENAME1 FILENAME2

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progress
     show operation progress
  -f, --a-format FMT
     specify FILENAME1 image format explicitly
  -F, --b-format FMT
     specify FILENAME2 image format explicitly
  --image-opts
     indicates that FILENAMEs are complete image specifications
     instead of file names (incompatible with --a-format and --b-format)
  -s, --strict
     strict mode, also check if sizes are equal
  -T, --cache CACHE_MODE
     images caching mode (writeback)
  -U, --force-share
     open images in shared mode for concurrent access
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME1, FILENAME2
     image files (or specifications) to compare

"#
        }
        "convert" => {
            r#"Usage:
Copy one image to another with optional format conversion.  Usage:

  qemu-img convert [-f SRC_FMT|--image-opts] [-T SRC_CACHE] [--bitmaps [--skip-broken-bitmaps]]
        [-o TGT_OPTS|--target-image-opts] [-t TGT_CACHE] [-n]
        [-B BACKING_FILENAME [-F BACKING_FMT]]
        SRC_FILENAME [SRC_FILENAME2 [...]] TGT_FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operations
  -p, --progress
     show operation progress
  -f, --source-format SRC_FMT
     specify SRC_FILENAME source image format explicitly
  --source-image-opts
     indicates that SRC_FILENAME is a complete image specification
     instead of a file name (incompatible with --source-format)
  -l, --source-snapshot SNAPSHOT_PARAMS
     specify source snapshot parameters
  -T, --source-cache SRC_CACHE
     source image(s) cache mode (writeback)
  -O, --target-format TGT_FMT
     specify TGT_FILENAME image format (default is raw)
  --target-image-opts
     indicates that TGT_FILENAME is a complete image specification
     instead of a file name (incompatible with --output-format)
  -o, --target-options TGT_OPTS
     TARGET_FMT-specific options
  -c, --compress
     create compressed output image (qcow and qcow2 format only)
  -t, --target-cache TGT_CACHE
     cache mode when opening output image (unsafe)
  -B, --backing BACKING_FILENAME
     create output to be a CoW on top of BACKING_FILENAME
  -F, --backing-format BACKING_FMT
     specify BACKING_FILENAME image format explicitly
  -n, --no-create
     omit target volume creation (eg on rbd)
  --target-is-zero
  -S, --sparse-size SPARSE_SIZE
     XXX todo
  --bitmaps
     also copy any persistent bitmaps present in source
  --skip-broken-bitmaps
     skip (do not error out) any broken bitmaps
  -U, --force-share
     open images in shared mode for concurrent access
  -r, --rate RATE
     I/O rate limit
  -m, --parallel NUM_COROUTINES
     specify parallelism (default 8)
  -C, --copy-range-offloading
     use copy_range offloading
  --salvage
     XXX todo
  -W, --oob-writes
     enable out-of-order writes to improve performance
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  SRC_FILENAME
     source image file name (or specification with --image-opts)
  TGT_FILENAME
     target (output) image file name

"#
        }
        "snapshot" => {
            r#"Usage:
List or manipulate snapshots within image.  Usage:

  qemu-img snapshot [-f FMT | --image-opts] [-l | -a|-c|-d SNAPSHOT]
        [-U] [--object OBJDEF] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
      quiet operations
  -f, --format FMT
      specify FILENAME format explicitly
  --image-opts
      indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  -U, --force-share
      open image in shared mode for concurrent access
  --object OBJDEF
      QEMU user-creatable object (eg encryption key)
  Operation, one of:
    -l, --list
       list snapshots in FILENAME (the default)
    -c, --create SNAPSHOT
       create named snapshot
    -a, --apply SNAPSHOT
       apply named snapshot to the base
    -d, --delete SNAPSHOT
       delete named snapshot
  FILENAME - image file name (or specification with --image-opts)

"#
        }
        "bitmap" => {
            r#"Usage:
Perform modifications of the persistent bitmap in the image.  Usage:

  qemu-img bitmap ( --merge SOURCE | --add | --remove | --clear |
                --enable | --disable ).. [-f FMT | --image-opts]
        [ -b SRC_FILENAME [-F SOURCE_FMT]] [-g SIZE[KMGTPE]] [--object OBJDEF]
        FILENAME BITMAP

Arguments:
  -h, --help
     print this help and exit
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
     instead of a file name (incompatible with --format)
  --add
     creates BITMAP, enables to record future edits
   -g, --granularity SIZE[KMGTPE]
     sets non-default bitmap granularity for --add to this size
  --remove
     removes BITMAP
  --clear
     clears BITMAP
  --enable, --disable
     starts and stops recording future edits to BITMAP
  --merge SRC_FILENAME
     merges contents of SRC_FILENAME bitmap into BITMAP
   -b, --source-file SRC_FILENAME
     select alternative source file for --merge
   -F, --source-format SRC_FMT
     specify format for SRC_FILENAME explicitly

"#
        }
        "resize" => {
            r#"Usage:
Resize the image to the new size.  Usage:

  qemu-img resize [-f FMT | --image-opts] [--preallocation PREALLOC] [--shrink]
        [--object OBJECTDEF] [-q] FILENAME [+-]SIZE[bkKMGTPE]

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  --shrink
     allow operation when new size is smaller than original
  --preallocation PREALLOC
     specify preallocation type for the new areas
  --object OBJDEF
     QEMU user-creatable object (eg encryption key)
  FILENAME
     image file (specification) to resize
  [+-]SIZE[bkKMGTPE]
     new image size or amount by which to shrink/grow,
     with optional suffix (1024-based multiplies)

"#
        }
        "amend" => {
            r#"Usage:
Update format-specific options of the image.  Usage:

  qemu-img amend [-f FMT | --image-opts] [t CACHE] [--force] [-p] [-q]
        [--object OBJDEF -o OPTIONS FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
     quiet operation
  -p, --progres
     show progress
  -f, --format FMT
     specify FILENAME format explicitly
  --image-opts
     indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  -t, --cache CACHE
     cache mode for FILENAME (writeback)
  --force
     allow certain unsafe operations

"#
        }
        _ => "",
    };
    t.replace("qemu-img", PROG)
}
