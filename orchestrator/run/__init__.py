"""Running a sweep: the only room that imports Ray. The driver and its stages (`driver`),
Ray start-up and resource arithmetic (`cluster`), the training trials (`trials`), the
ensemble stage's jobs (`jobs`), the Ray Data feature cache (`features`), Tune's callbacks
(`callbacks`) and the live view (`live`)."""
