// Named fault-injection points for scripts/emulator_mutations.sh.
//
// TIDAR_MUTATION(name, normal, mutated) expands to the tokens of `normal`, so every build
// compiles exactly the code written there; a build with -DTIDAR_MUTATE_name (value 1, what a
// bare -D gives) gets `mutated` instead. The script builds the emulated kernels once per name
// and requires each such build to fail its checks, so a fault the checks should catch stays
// tied to the line it breaks, whatever else is edited around it.
//
// Neither argument may hold a comma outside parentheses (split the point in two instead);
// `mutated` may be empty (a statement removed).
#pragma once

// 1 if the argument expands to 1, else 0 (an undefined TIDAR_MUTATE_name stays a bare name).
#define TIDAR_MUTATION_ARG_1 0,
#define TIDAR_MUTATION_SECOND_(ignored, bit, ...) bit
#define TIDAR_MUTATION_BIT_(arg_or_junk) TIDAR_MUTATION_SECOND_(arg_or_junk 1, 0, ~)
#define TIDAR_MUTATION_FLAG_(value) TIDAR_MUTATION_BIT_(TIDAR_MUTATION_ARG_##value)
#define TIDAR_MUTATION_EXPAND_(flag) TIDAR_MUTATION_FLAG_(flag)

#define TIDAR_MUTATION_PICK_0(normal, mutated) normal
#define TIDAR_MUTATION_PICK_1(normal, mutated) mutated
#define TIDAR_MUTATION_PICK_(bit, normal, mutated) TIDAR_MUTATION_PICK_##bit(normal, mutated)
#define TIDAR_MUTATION_SELECT_(bit, normal, mutated) TIDAR_MUTATION_PICK_(bit, normal, mutated)

#define TIDAR_MUTATION(name, normal, mutated) \
  TIDAR_MUTATION_SELECT_(TIDAR_MUTATION_EXPAND_(TIDAR_MUTATE_##name), normal, mutated)
