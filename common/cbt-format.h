/* sparsebackup: the cbt file format's constants (doc/cbt-format.md):
 * sizes, feature bits and the byte offsets of the fields of a superblock
 * and of a checkpoint table entry.  Shared by common/cbt-*.c and the
 * tests that craft or damage cbt files.
 */

#ifndef SPARSEBACKUP_CBT_FORMAT_H
#define SPARSEBACKUP_CBT_FORMAT_H


#define SB_SIZE 4096
#define DATA_START (2 * SB_SIZE)
#define ALIGN 4096
#define PAGE 4096               /* write-ahead unit of the current bitmap */
#define CHUNK 65536             /* bitmap bytes processed at a time */
#define ENTRY_SIZE 128
#define FORMAT_VERSION 1
/* The magic (8 bytes) is cbt_magic in cbt-internal.h. */

#define INCOMPAT_IN_USE 1
#define INCOMPAT_KNOWN INCOMPAT_IN_USE
#define COMPAT_WRITE_AHEAD 1
#define COMPAT_KNOWN COMPAT_WRITE_AHEAD
#define AUTOCLEAR_KNOWN 0

/* Superblock field offsets. */
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
#define SB_CUR_OFF 80
#define SB_CUR_CRC 88
#define SB_ID_LEN 92
#define SB_ID 96
#define SB_RESERVED (SB_ID + 256)
#define SB_CRC (SB_SIZE - 4)

/* Checkpoint table entry field offsets. */
#define CP_NAME 0
#define CP_STATE 64
#define CP_FLAGS 68
#define CP_BM_OFF 72
#define CP_BM_CRC 80
#define CP_RESERVED1 84
#define CP_CREATED 88
#define CP_RESERVED2 96

#endif /* SPARSEBACKUP_CBT_FORMAT_H */
