/* sparsebackup-copy: image format signatures.  A raw copy written over a
 * qcow2 file (or any other image format) destroys the backup it held, so
 * the target's first bytes and last 512 bytes are compared against the
 * signatures of the formats a backup is commonly kept in.  Pure functions
 * of the bytes; the caller compares with the source's bytes at the same
 * place (a raw copy of a disk that itself starts with, say, a LUKS
 * header legitimately carries that header).
 */

#include <config.h>

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "copy.h"

static bool
at (const unsigned char *buf, size_t len, size_t off, const void *sig,
    size_t n)
{
  return off + n <= len && memcmp (buf + off, sig, n) == 0;
}

const char *
probe_head (const unsigned char *buf, size_t len)
{
  /* VDI: the signature 0xbeda107f (little endian) at offset 0x40. */
  static const unsigned char vdi[] = { 0x7f, 0x10, 0xda, 0xbe };

  if (at (buf, len, 0, "QFI\xfb", 4))
    return len >= 8 && buf[4] == 0 && buf[5] == 0 && buf[6] == 0 &&
      buf[7] == 1 ? "a qcow (version 1) image" : "a qcow2 image";
  if (at (buf, len, 0, "QED\0", 4))
    return "a QED image";
  if (at (buf, len, 0, "LUKS\xba\xbe", 6))
    return "a LUKS image";
  if (at (buf, len, 0, "KDMV", 4))
    return "a VMDK (sparse extent) image";
  if (at (buf, len, 0, "COWD", 4))
    return "a VMDK (ESX sparse extent) image";
  if (at (buf, len, 0, "# Disk DescriptorFile", 21))
    return "a VMDK (descriptor) image";
  if (at (buf, len, 0, "vhdxfile", 8))
    return "a VHDX image";
  if (at (buf, len, 0, "conectix", 8))
    return "a VHD (vpc, dynamic) image";
  if (at (buf, len, 0x40, vdi, sizeof vdi))
    return "a VDI image";
  if (at (buf, len, 0, "<<< Oracle VM VirtualBox Disk Image >>>", 39) ||
      at (buf, len, 0, "<<< Sun xVM VirtualBox Disk Image >>>", 37) ||
      at (buf, len, 0, "<<< innotek VirtualBox Disk Image >>>", 37))
    return "a VDI image";
  if (at (buf, len, 0, "WithoutFreeSpace", 16) ||
      at (buf, len, 0, "WithouFreSpacExt", 16))
    return "a Parallels image";
  if (at (buf, len, 0, "Bochs Virtual HD Image", 22))
    return "a Bochs image";
  if (at (buf, len, 0, "#!/bin/sh\n#V2.0 Format", 22))
    return "a cloop image";
  if (at (buf, len, 0, "SBKCBT\r\n", 8))
    return "a sparsebackup cbt file";
  if (at (buf, len, 0, "sparsebackup-copy ", 18))
    return "a sparsebackup-copy journal or manifest";
  return NULL;
}

const char *
probe_tail (const unsigned char *buf)
{
  if (memcmp (buf, "conectix", 8) == 0)
    return "a VHD (vpc, fixed: footer at the end) image";
  if (memcmp (buf, "koly", 4) == 0)
    return "a DMG image";
  return NULL;
}
