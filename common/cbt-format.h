/* sparsebackup: the cbt file format's constants (doc/cbt-format.md):
 * sizes, feature bits and the byte offsets of the fields of a superblock,
 * of a checkpoint table entry, of a record index entry and of a
 * directory entry, for version 2 (written) and version 1 (read and
 * converted).  Shared by common/cbt-*.c and the tests that craft or
 * damage cbt files.
 */

#ifndef SPARSEBACKUP_CBT_FORMAT_H
#define SPARSEBACKUP_CBT_FORMAT_H

#define SB_SIZE 4096
#define DATA_START (2 * SB_SIZE)
#define ALIGN 4096
#define BLOCK 4096              /* unit of allocation in the file */
#define BLOCK_SHIFT 12
#define PAGE 4096               /* bytes of a bitmap page */
#define PAGE_GRAN_SHIFT 15      /* granules per page: 2^15 = PAGE * 8 */
#define ENTRY_SIZE 128          /* checkpoint table entry */
#define IDX_SIZE 16             /* record index entry */
#define DIR_SIZE 8              /* directory entry */
#define FORMAT_VERSION 2
#define FORMAT_VERSION_1 1
/* The magic (8 bytes) is cbt_magic in cbt-private.h. */

#define INCOMPAT_IN_USE 1
#define INCOMPAT_KNOWN INCOMPAT_IN_USE
#define COMPAT_KNOWN 0
#define AUTOCLEAR_KNOWN 0
/* Version 1 only: the writer recorded changes before they happened. */
#define COMPAT1_WRITE_AHEAD 1
#define COMPAT1_KNOWN COMPAT1_WRITE_AHEAD
#define CHUNK1 65536            /* version 1 bitmap bytes read at a time */

/* Superblock field offsets, the same in both versions up to SB_ID. */
#define SB_MAGIC 0
#define SB_VERSION 8
#define SB_HEADER_SIZE 12
#define SB_SEQ 16
#define SB_INCOMPAT 24
#define SB_COMPAT 32
#define SB_AUTOCLEAR 40
#define SB_DISK_SIZE 48
#define SB_GRAN_BITS 56
#define SB_NR_CPS 60
#define SB_TABLE_OFF 64
#define SB_TABLE_SIZE 72
#define SB_TABLE_CRC 76
#define SB_CUR_OFF 80           /* v1: current bitmap; v2: its directory */
#define SB_CUR_CRC 88
#define SB_ID_LEN 92
#define SB_ID 96
#define SB_RESERVED1 (SB_ID + 256)      /* version 1: reserved to the crc */
/* Version 2. */
#define SB_NEXT_OFF 352         /* the next directory */
#define SB_DIR_SIZE 360         /* bytes of a directory */
#define SB_MODE 364             /* how the writer records while in use */
#define SB_NEXT_SERIAL 368
#define SB_BOOT_LEN 376
#define SB_BOOT_ID 380          /* 64 bytes */
#define SB_RESERVED 444
#define SB_CRC (SB_SIZE - 4)

/* Checkpoint table entry field offsets (v1 and v2 share name, state,
 * flags and created).
 */
#define CP_NAME 0
#define CP_STATE 64
#define CP_FLAGS 68
#define CP_CREATED 88
/* Version 2. */
#define CP_IDX_OFF 72
#define CP_IDX_CRC 80
#define CP_IDX_COUNT 84
#define CP_SERIAL 96
#define CP_RESERVED 104
/* Version 1. */
#define CP1_BM_OFF 72
#define CP1_BM_CRC 80
#define CP1_RESERVED1 84
#define CP1_RESERVED2 96

/* Record index entry (version 2). */
#define IDX_PAGE 0
#define IDX_CRC 4
#define IDX_OFF 8

/* Directory entry (version 2): block number, then its check. */
#define DIR_BLOCK 0
#define DIR_CHECK 4

#endif /* SPARSEBACKUP_CBT_FORMAT_H */
