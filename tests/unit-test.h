/* sparsebackup: failure reporting for the C unit tests.
 *
 *   #define TEST_NAME "test-foo"
 *   #include "unit-test.h"
 *   CHECK (x == 1);  FAIL ("got %d", x);  return failures ? 1 : 0;
 *
 * FAIL prints the message with the line number and counts it; after 20
 * failures the program exits (status 1).
 */
#ifndef SPARSEBACKUP_UNIT_TEST_H
#define SPARSEBACKUP_UNIT_TEST_H

#include <stdio.h>
#include <stdlib.h>

static unsigned failures;

#define FAIL(fmt, ...)                                                  \
  do {                                                                  \
    fprintf (stderr, TEST_NAME ": FAIL (line %d): " fmt "\n",           \
             __LINE__, __VA_ARGS__);                                    \
    if (++failures > 20) exit (EXIT_FAILURE);                           \
  } while (0)

#define CHECK(cond)                                                     \
  do {                                                                  \
    if (!(cond))                                                        \
      FAIL ("%s", #cond);                                               \
  } while (0)

#endif /* SPARSEBACKUP_UNIT_TEST_H */
